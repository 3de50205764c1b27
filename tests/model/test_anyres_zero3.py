"""A tiny AnyRes video model (data.video_frames) trained on 2 CPU ranks under ZeRO-3 with multi-image + clip,
single-image, clip-only, interleaved-document and text-only samples, the ranks' tile and frame counts deliberately
uneven (one shard of many-tile multi-image samples each with a clip, one of a small image, a text, a short clip and
a document), under a timeout so a rank that skipped a module call would fail here instead of hanging. Then
`convert` writes a LlavaNextVideo directory that plain transformers loads, its chat template renders typed messages
(images and a video) as training did, and its loss on a sample is the training forward's."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers.clips import make_clip
from helpers.export import run_config
from helpers.model import consolidated
from helpers.runs import launch, write_config
from helpers.shards import image_bytes, write_tar
from PIL import Image
from transformers import AutoModelForImageTextToText, LlavaNextProcessor

from pretrain.cli import main
from pretrain.config import DataSource
from pretrain.data.batching import collate
from pretrain.eval.loading import load_llava
from pretrain.eval.run import EvalOptions, evaluate
from pretrain.export.hf import convert, resolve_checkpoint
from pretrain.model.build import build_model, load_tokenizer
from pretrain.model.processing import build_processing
from pretrain.model.vlm import VLMForTraining

pytestmark = pytest.mark.slow
CAPTION = "a red circle left of a blue square."


def _conversation(question: str) -> bytes:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": CAPTION}]
    return json.dumps({"conversations": turns}).encode()


def _shards(root) -> tuple[list[str], dict[str, dict]]:
    """Shard 0: two panoramas (4 tiles each) and a clip (3 frames sampled) per sample. Shard 1: a small single image
    (2 tiles), a text-only sample, a 2-frame clip and an interleaved document (one image between two texts): 4
    samples, all of them read in the run's 2 steps."""
    heavy = [(f"multi{i}", {"0.png": image_bytes("PNG", (1000, 60), seed=i),
                            "1.jpg": image_bytes("JPEG", (60, 900), seed=10 + i),
                            "mp4": make_clip(frames=12 + i, width=40, height=36),
                            "json": _conversation("<image>\n<image>\n<video>\nwhat is in them?")}) for i in range(4)]
    light = [(f"single{i}", {"png": image_bytes("PNG", (5, 3), seed=20 + i), "txt": CAPTION.encode()})
             for i in range(1)]
    light += [(f"text{i}", {"json": _conversation("describe a red circle.")}) for i in range(1)]
    light += [("clip0", {"webm": make_clip(frames=2, container="webm", codec="libvpx-vp9"),
                         "json": _conversation("<video>\nwhat moves?")})]
    light += [(f"doc{i}", {"0.png": image_bytes("PNG", (40, 70), seed=30 + i),
                           "json": json.dumps({"texts": ["A page about shapes.", None, CAPTION],
                                               "images": [None, f"page{i}.png", None]}).encode()})
              for i in range(1)]
    root.mkdir(parents=True, exist_ok=True)
    urls = [str(write_tar(root / "shard-000000.tar", heavy)), str(write_tar(root / "shard-000001.tar", light))]
    return urls, dict(heavy + light)


def test_anyres_video_trains_on_uneven_ranks_under_zero3_and_exports_as_llava_next_video(tmp_path, assets, shapes,
                                                                                          capsys):
    urls, parts = _shards(tmp_path / "data")
    cfg_path = write_config(tmp_path / "c.yaml", assets, shapes, **{
        "model.image_tiling": "anyres", "model.max_image_tiles": 10, "data.train": [{"urls": urls}],
        "data.video_frames": 3,
        "data.val": [], "data.max_length": 512, "data.record_samples": True, "data.shuffle_buffer": 4,
        "train.micro_batch_size": 2, "train.max_steps": 2, "checkpoint.every_steps": 2, "deepspeed.zero_stage": 3,
        # Every parameter partitioned, image_newline too (a small one would be kept whole on each rank otherwise).
        "deepspeed.param_persistence_threshold": 0})
    done = launch(cfg_path, nproc=2, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    cfg = run_config(run)
    processing = build_processing(cfg, load_tokenizer(cfg.model, video=True))
    processed = {k: processing.processor(p) for k, p in parts.items()}
    tiles = {k: 0 if s.pixel_values is None else s.pixel_values.shape[0] for k, s in processed.items()}
    frames = {k: 0 if s.video_pixels is None else s.video_pixels.shape[0] for k, s in processed.items()}
    steps = [[json.loads(line) for line in (run / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    per_rank = [[sum(tiles[k["key"]] for k in s["keys"]) for s in rank] for rank in steps]
    frames_per_rank = [[sum(frames[k["key"]] for k in s["keys"]) for s in rank] for rank in steps]
    # The unevenness occurred: every step, the ranks' micro-batches had different tile and frame counts.
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert all(a != b for a, b in zip(*per_rank)), per_rank
    assert all(a != b for a, b in zip(*frames_per_rank)), frames_per_rank
    assert frames["multi0"] == 3 and frames["clip0"] == 2  # fewer frames for the short clip
    seen = {k["key"] for rank in steps for s in rank for k in s["keys"]}
    assert any(k.startswith("multi") for k in seen) and any(not k.startswith("multi") for k in seen)
    assert any(k.startswith("doc") for k in seen) and tiles["doc0"] > 0, seen  # an interleaved document trained

    out = convert(run, tmp_path / "hf", "fp32")
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    # The export's processor is LlavaNextVideoProcessor (its video half needs torchvision: test_video_parity loads
    # it whole); its image half and tokenizer load here as LlavaNextProcessor.
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "LlavaNextVideoProcessor"
    processor = LlavaNextProcessor.from_pretrained(out)
    assert processor.image_processor.image_grid_pinpoints == processing.vlm_config.image_grid_pinpoints
    state = consolidated(resolve_checkpoint(run))
    assert "model.image_newline" in state
    torch.testing.assert_close(model.model.image_newline.detach(), state["model.image_newline"], rtol=0, atol=0)
    # `pretrain eval` reads the checkpoint without an export: the same model, image_newline included.
    direct = load_llava(resolve_checkpoint(run), torch.device("cpu"), torch.float32)
    assert type(direct).__name__ == "LlavaNextVideoForConditionalGeneration"
    torch.testing.assert_close(direct.model.image_newline.detach(), state["model.image_newline"], rtol=0, atol=0)

    wrapper = VLMForTraining(build_model(cfg.model, processing.tokenizer, seed=cfg.run.seed))
    wrapper.vlm.load_state_dict(state, strict=True)
    wrapper.eval()
    sample = processing.processor(parts["multi0"])
    images = [Image.open(io.BytesIO(parts["multi0"][k])).convert("RGB") for k in ("0.png", "1.jpg")]
    # Typed messages through the export's own chat template render what training rendered.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "what is in them?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": CAPTION}]}]
    text = processor.apply_chat_template(messages)
    tok = processing.tokenizer
    inputs = processor(images=images, text=text, return_tensors="pt", add_special_tokens=False)
    video_id, per_clip = model.config.video_token_id, sample.input_ids.count(model.config.video_token_id)
    ids = [x for t in inputs["input_ids"][0].tolist() for x in ([t] * per_clip if t == video_id else [t])]
    assert ids == sample.input_ids and per_clip == 3 * 4  # the same image and video token counts, in place
    inputs.update(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                  pixel_values_videos=sample.video_pixels[None])
    with torch.no_grad():
        loss_sum, n = wrapper(collate([[sample]], tok.pad_token_id))
        theirs = model(**inputs, labels=torch.tensor([sample.labels])).loss
    torch.testing.assert_close(loss_sum / n, theirs, rtol=1e-5, atol=1e-6)

    # `pretrain eval` validates on every kind through the training loader: all 8 samples, none left out of the
    # loss; the image-ablation gap sees the tiled images and the clips; the task metrics say what they cannot use.
    cfg.data.val = [DataSource(urls=urls)]
    result = evaluate(cfg, run, EvalOptions(samples=8, batch_size=4, max_new_tokens=2, device="cpu",
                                            tasks=("loss", "captioning")))
    assert result["val"]["samples"] == 8 and result["val"]["skipped"] == {}
    assert abs(result["val"]["image_gap"]) > 1e-6
    assert result["task_samples"] == {"used": 0, "left_out": {"video": 5, "tiled": 1, "text": 1, "interleaved": 1}}

    # `pretrain generate --video` answers about a clip with the export, sampling the run's 3 frames; --image works
    # on the same export.
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(parts["multi1"]["mp4"])
    image = tmp_path / "a.png"
    image.write_bytes(parts["single0"]["png"])
    assert json.loads((out / "video_preprocessor_config.json").read_text())["num_frames"] == 3
    for media in (["--video", str(clip)], ["--image", str(image)]):
        capsys.readouterr()
        assert main(["generate", str(out), *media, "--prompt", "what moves?", "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith(media[1] + "\t")
