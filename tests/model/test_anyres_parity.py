"""AnyRes (model.image_tiling=anyres) against plain transformers: for images of many sizes and aspect ratios our
loader's pixel tensors and image-token counts equal what the exported LlavaNextProcessor makes, and our training
forward's loss on a sample equals the exported LlavaNextForConditionalGeneration's loss on the same sample fed
through that processor (fp32)."""

from __future__ import annotations

import io

import pytest
import torch
from helpers.shards import image_bytes
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from pretrain.config import build_config
from pretrain.data.anyres import default_pinpoints, llava_next_processor
from pretrain.data.batching import collate
from pretrain.data.errors import SampleError
from pretrain.model.build import build_model
from pretrain.model.processing import build_processing
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES
from pretrain.model.vlm import VLMForTraining

# (height, width): tiny, panoramic 1000x60, its portrait twin, odd sizes, one tile exactly, large and square-ish.
SIZES = [(3, 5), (60, 1000), (1000, 60), (37, 23), (33, 97), (32, 32), (50, 20), (300, 200), (95, 96)]


def _config(vision: str = "clip", **model):
    return build_config({
        "model": {"llm": dict(DECODER_SHAPES["llama"]), "vision": dict(VISION_SHAPES[vision]), "tokenizer": "unused",
                  "image_tiling": "anyres", **model},
        "data": {"train": [{"urls": "unused.tar"}], "max_length": 2048},
        "train": {"max_steps": 1},
    })


def _export(tmp_path, tokenizer, cfg, processing):
    """The model and its processor saved as transformers saves them, then loaded back by plain transformers."""
    model = build_model(cfg.model, tokenizer).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    llava_next_processor(processing.image_processor, tokenizer, model.config).save_pretrained(tmp_path)
    return model, LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval(), AutoProcessor.from_pretrained(
        tmp_path)


def _caption_parts(sizes: list[tuple[int, int]], caption: str = "two red circles.") -> tuple[dict, list]:
    encoded = [image_bytes("PNG", (w, h), seed=i) for i, (h, w) in enumerate(sizes)]
    parts = {f"{i}.png": data for i, data in enumerate(encoded)} if len(sizes) > 1 else {"png": encoded[0]}
    return {**parts, "txt": caption.encode()}, [Image.open(io.BytesIO(d)).convert("RGB") for d in encoded]


def _hf_text(tokenizer, n_images: int, caption: str) -> str:
    """Our caption layout written out for the processor: [bos] <image>... caption eos."""
    return tokenizer.bos_token + "<image>" * n_images + caption + tokenizer.eos_token


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_pixels_and_token_counts_equal_the_exported_processor(tmp_path, tokenizer, vision):
    cfg = _config(vision)
    processing = build_processing(cfg, tokenizer)
    _, _, hf_proc = _export(tmp_path, tokenizer, cfg, processing)
    assert type(hf_proc).__name__ == "LlavaNextProcessor"
    grids = set()
    for size in SIZES:
        parts, images = _caption_parts([size])
        ours = processing.processor(parts)
        theirs = hf_proc(images=images, text=_hf_text(tokenizer, 1, "two red circles."), return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours.input_ids, size  # same token count, same place
        assert ours.image_sizes == [size] and theirs["image_sizes"].tolist() == [list(size)]
        torch.testing.assert_close(ours.pixel_values, theirs["pixel_values"][0], rtol=0, atol=0)
        assert ours.image_tiles == [ours.pixel_values.shape[0]]
        grids.add(ours.pixel_values.shape[0])
    assert len(grids) >= 4  # the sizes really took different grids (1x1 .. 3x3 plus the base)


def test_training_loss_equals_the_exported_llava_next_loss(tmp_path, tokenizer):
    cfg = _config()
    processing = build_processing(cfg, tokenizer)
    model, hf_model, hf_proc = _export(tmp_path, tokenizer, cfg, processing)
    wrapper = VLMForTraining(model).eval()
    for sizes in ([(60, 1000), (50, 20)], [(37, 23)]):  # two images of different grids, then one
        caption = "a blue square above two red circles."
        parts, images = _caption_parts(sizes, caption)
        sample = processing.processor(parts)
        assert len(sample.image_tiles) == len(sizes) and len(set(sample.image_tiles)) == len(sizes)
        with torch.no_grad():
            loss_sum, n = wrapper(collate([[sample]], tokenizer.pad_token_id))
            inputs = hf_proc(images=images, text=_hf_text(tokenizer, len(sizes), caption), return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == sample.input_ids
            theirs = hf_model(**inputs, labels=torch.tensor([sample.labels])).loss
        torch.testing.assert_close(loss_sum / n, theirs, rtol=1e-5, atol=1e-6)
    # The check can fail: without the learned newline the features (and the loss) differ.
    with torch.no_grad():
        model.model.image_newline.mul_(-1)
        moved, n = wrapper(collate([[sample]], tokenizer.pad_token_id))
    assert not torch.allclose(moved / n, theirs, rtol=1e-4)


def test_image_newline_gets_a_gradient_with_and_without_images(tokenizer):
    """Every rank must use (and reduce) image_newline every step: a text-only micro-batch runs a dummy grid."""
    cfg = _config()
    processing = build_processing(cfg, tokenizer)
    wrapper = VLMForTraining(build_model(cfg.model, tokenizer)).train()
    newline = wrapper.vlm.model.image_newline
    text_only = processing.processor({"json": b'{"conversations": [{"from": "human", "value": "hi"}, '
                                              b'{"from": "gpt", "value": "hello"}]}'})
    parts, _ = _caption_parts([(40, 90)])
    for sample, nonzero in ((text_only, False), (processing.processor(parts), True)):
        newline.grad = None
        loss, _ = wrapper(collate([[sample]], tokenizer.pad_token_id))
        loss.backward()
        assert newline.grad is not None and bool(newline.grad.abs().sum() > 0) == nonzero


def test_default_pinpoints_follow_the_tower_and_the_tile_cap(tokenizer):
    assert default_pinpoints(32) == [[32 * r, 32 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
    assert max(r * c for r, c in (([h // 32, w // 32]) for h, w in default_pinpoints(32, 5))) == 4
    cfg = _config(max_image_tiles=5)
    processing = build_processing(cfg, tokenizer)
    assert processing.vlm_config.image_grid_pinpoints == default_pinpoints(32, 5)
    parts, _ = _caption_parts([(60, 1000)])
    assert processing.processor(parts).pixel_values.shape[0] == 4  # 1 x 3 grid + base, within the cap
    two, _ = _caption_parts([(60, 1000), (60, 1000)])
    with pytest.raises(SampleError) as e:
        processing.processor(two)
    assert e.value.reason == "too_many_image_tiles"
    with pytest.raises(ValueError, match="max_image_tiles"):
        default_pinpoints(32, 1)


def test_the_anyres_sample_processor_pickles_into_workers(tokenizer):
    import pickle

    processing = build_processing(_config(), tokenizer)
    parts, _ = _caption_parts([(60, 1000)])
    again = pickle.loads(pickle.dumps(processing.processor))
    assert again(parts).input_ids == processing.processor(parts).input_ids
