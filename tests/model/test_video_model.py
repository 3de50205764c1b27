"""Video in the model (data.video_frames with model.image_tiling=anyres): a clip's sampled frames become tower
pixels and `<video>` tokens, and the training forward's loss on a sample with a clip (and an image beside it) equals
the exported LlavaNextVideoForConditionalGeneration's loss on the same inputs through plain transformers (fp32)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.clips import make_clip, video_config
from helpers.shards import image_bytes
from transformers import LlavaNextVideoForConditionalGeneration

from pretrain.data.batching import collate, vision_cost
from pretrain.data.errors import SampleError
from pretrain.model.build import build_model
from pretrain.model.processing import build_processing
from pretrain.model.video import tokens_per_frame
from pretrain.model.vlm import VLMForTraining
from pretrain.tokens import VIDEO_TOKEN


@pytest.fixture(scope="module")
def video_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    return tok


def clip_parts(frames: int = 24, question: str = "<video>\nWhat happens?", image: bool = False) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "the picture gets brighter."}]
    parts = {"mp4": make_clip(frames=frames, width=48, height=40),
             "json": json.dumps({"conversations": turns}).encode()}
    if image:
        parts["0.png"] = image_bytes("PNG", (50, 20), seed=3)
    return parts


def test_clip_frames_tokens_and_vision_cost(video_tokenizer):
    processing = build_processing(video_config(frames=4), video_tokenizer)
    vid = processing.vlm_config.video_token_id
    per_frame = tokens_per_frame(processing.vlm_config.vision_config)
    for frames, taken in ((24, 4), (3, 3), (1, 1)):  # fewer frames for a short clip
        sample = processing.processor(clip_parts(frames))
        assert sample.video_pixels.shape == (taken, 3, 32, 32) and sample.pixel_values is None
        assert sample.input_ids.count(vid) == taken * per_frame and vision_cost(sample) == taken
    mixed = processing.processor(clip_parts(question="<image> then <video>: same?", image=True))
    assert vision_cost(mixed) == mixed.pixel_values.shape[0] + 4
    by_rate = build_processing(video_config(frames=8, video_fps=1.0), video_tokenizer)
    assert by_rate.processor(clip_parts(24)).video_pixels.shape[0] == 2  # a 2 s clip at 1 frame per second
    for bad, reason in ((clip_parts(question="no placeholder"), "missing_video"),
                        ({**clip_parts(), "mp4": b"\0" * 100}, "corrupt_video")):
        with pytest.raises(SampleError) as e:
            processing.processor(bad)
        assert e.value.reason == reason


def test_video_off_skips_clips(tokenizer):
    processing = build_processing(video_config(frames=0), tokenizer)
    assert processing.processor.video is None
    with pytest.raises(SampleError) as e:
        processing.processor(clip_parts())
    assert e.value.reason == "video_off"


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_training_loss_equals_the_exported_llava_next_video_loss(tmp_path, video_tokenizer, vision):
    cfg = video_config(vision)
    processing = build_processing(cfg, video_tokenizer)
    model = build_model(cfg.model, video_tokenizer).eval()
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    model.save_pretrained(tmp_path)
    hf_model = LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path).eval()
    wrapper = VLMForTraining(model).eval()
    samples = [processing.processor(clip_parts()),
               processing.processor(clip_parts(question="<image> then <video>: same?", image=True))]
    for sample in samples:
        with torch.no_grad():
            loss_sum, n = wrapper(collate([[sample]], video_tokenizer.pad_token_id))
            inputs = {"input_ids": torch.tensor([sample.input_ids]), "labels": torch.tensor([sample.labels]),
                      "pixel_values_videos": sample.video_pixels[None]}
            if sample.pixel_values is not None:
                inputs.update(pixel_values=sample.pixel_values[None], image_sizes=torch.tensor(sample.image_sizes))
            theirs = hf_model(**inputs).loss
            # the clip's features themselves: the exported class's own video path (tower, pooler, projector)
            cfg = hf_model.config
            hf_clip = hf_model.model.get_video_features(
                pixel_values_videos=sample.video_pixels[None], vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
            batch = collate([[sample]], video_tokenizer.pad_token_id)
            _, ours_clip, _ = wrapper.visual_features(batch["pixel_values"], batch["image_sizes"],
                                                      batch["video_pixels"])
        torch.testing.assert_close(ours_clip, hf_clip.flatten(0, 1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_sum / n, theirs, rtol=1e-5, atol=1e-6)
    # The check can fail: other frames give other features and another loss.
    with torch.no_grad():
        sample.video_pixels = torch.randn_like(sample.video_pixels)
        moved, n = wrapper(collate([[sample]], video_tokenizer.pad_token_id))
    assert not torch.allclose(moved / n, theirs, rtol=1e-4)


def test_a_batch_with_clips_and_one_without_use_the_same_modules(video_tokenizer):
    """Lockstep: every forward calls the tower, the pooler and the projector once, clips or not; image_newline gets a
    gradient either way (the dummy image)."""
    cfg = video_config()
    processing = build_processing(cfg, video_tokenizer)
    wrapper = VLMForTraining(build_model(cfg.model, video_tokenizer)).train()
    calls = []
    for name in ("vision_tower", "vision_resampler", "multi_modal_projector"):
        getattr(wrapper.vlm.model, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    text_only = processing.processor({"json": b'{"conversations": [{"from": "human", "value": "hi"}, '
                                              b'{"from": "gpt", "value": "hello"}]}'})
    newline = wrapper.vlm.model.image_newline
    for sample in (text_only, processing.processor(clip_parts())):
        calls.clear()
        newline.grad = None
        loss, _ = wrapper(collate([[sample]], video_tokenizer.pad_token_id))
        loss.backward()
        assert sorted(calls) == ["multi_modal_projector", "vision_resampler", "vision_tower"]
        assert newline.grad is not None


def test_video_keys_are_checked():
    from pretrain.config import ConfigError, build_config

    base = {"model": {"llm": "x", "vision": "y"}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="data.video_frames > 0 needs model.image_tiling=anyres"):
        build_config({**base, "data": {"train": [{"urls": "a.tar"}], "video_frames": 8}})
    with pytest.raises(ConfigError, match="data.video_fps needs data.video_frames"):
        build_config({**base, "model": {**base["model"], "image_tiling": "anyres"},
                      "data": {"train": [{"urls": "a.tar"}], "video_fps": 1.0}})
    with pytest.raises(ConfigError, match="video_frames"):
        build_config({**base, "data": {"train": [{"urls": "a.tar"}], "video_frames": -1}})
