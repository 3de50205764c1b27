"""One 2-rank ZeRO-3 run with a user's DeepSpeed JSON (LLaVA's zero3.json), validation with generated captions, and
the TensorBoard event file read back with TensorBoard's own EventAccumulator. The same run cuts every caption to
data.max_length (the count reaches metrics.jsonl) and saves by the clock alone (checkpoint.every_minutes)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers.runs import launch, metrics, write_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer_units import LLAVA_ZERO3

from pretrain.data.errors import REASONS
from pretrain.train import checkpoint as ckpt
from pretrain.train.schedule import lr_lambda

pytestmark = pytest.mark.slow

LR, WARMUP, STEPS = 3e-3, 2, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, assets, shapes):
    root = tmp_path_factory.mktemp("monitoring")
    (root / "zero3.json").write_text(json.dumps(LLAVA_ZERO3))
    cfg = write_config(root / "c.yaml", assets, shapes, **{
        "deepspeed.config_file": str(root / "zero3.json"), "train.max_steps": STEPS, "train.lr": LR,
        "train.warmup_steps": WARMUP, "train.schedule": "linear", "train.min_lr_ratio": 0.1,
        "train.lr_multipliers": {"projector": 2.0}, "train.val_every": 2, "train.val_batches": 2,
        "train.val_captions": 2, "train.val_caption_tokens": 6,
        # Every test sample renders to 25 tokens, its image's included: 24 cuts one text token off each.
        "data.max_length": 24,
        # 60 ns: due at every step (a save to the next step's decision takes longer) by rank 0's clock; every_steps 0.
        "checkpoint.every_minutes": 1e-9, "checkpoint.every_steps": 0, "checkpoint.keep_last": STEPS})
    out = launch(cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    return root / "run"


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_the_user_deepspeed_json_is_merged_and_used(run):
    ds = json.loads((run / "ds_config.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["sub_group_size"] == 1e9 and zero["stage3_max_reuse_distance"] == 1e9
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the file's explicit value
    assert zero["reduce_bucket_size"] == 50_000_000  # its "auto": our value
    assert (ds["train_batch_size"], ds["bf16"]["enabled"], ds["fp16"]) == (8, False, {"enabled": False})
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4] and (run / "DONE").is_file()


def test_tensorboard_has_the_training_scalars_and_lr_per_group(run):
    acc = _events(run)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/step_time_s",
                "train/data_wait_frac", "train/tflops_per_rank", "train/lr", "val/loss", "val/perplexity",
                "lr/projector", "lr/projector_no_decay", "lr/llm", "lr/vision"):
        assert tag in scalars, tag
    assert {f"data/skipped_{r}" for r in REASONS} <= scalars  # every reason, zeros included
    # MFU and GPU memory only where there is a GPU.
    assert ("train/mfu" in scalars) == torch.cuda.is_available()
    assert ("train/gpu_mem_gib" in scalars) == torch.cuda.is_available()
    series = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in ("lr/llm", "lr/projector", "train/lr")}
    fn = lr_lambda("linear", WARMUP, STEPS, 0.1)
    for step in range(1, STEPS + 1):  # the rate each step used: warm-up, then linear decay; projector x2
        assert series["lr/llm"][step] == pytest.approx(LR * fn(step - 1), rel=1e-6)
        assert series["lr/projector"][step] == pytest.approx(2 * series["lr/llm"][step], rel=1e-6)
    assert sorted(e.step for e in acc.Scalars("val/loss")) == [2, 4]
    rows = metrics(run)
    assert all(r["mfu"] is None and r["tflops_per_rank"] > 0 for r in rows)  # FLOPs counted; no peak on CPU
    # The peak memory `pretrain plan --calibrate` reads: on CPU the rank's peak RSS, which only grows.
    peaks = [r["gpu_mem_gib" if torch.cuda.is_available() else "host_peak_rss_gib"] for r in rows]
    assert 0.1 < peaks[0] <= peaks[-1] < 64 and peaks == sorted(peaks)
    assert all(r["lr"] == pytest.approx(series["train/lr"][r["step"]]) for r in rows)


def test_validation_captions_reach_tensorboard_and_val_jsonl(run):
    acc = _events(run)
    assert sorted(acc.Tags()["images"]) == ["val/caption_0", "val/caption_1"]
    for tag in ("val/caption_0", "val/caption_1"):
        events = acc.Images(tag)
        assert [e.step for e in events] == [2, 4]
        picture = Image.open(io.BytesIO(events[-1].encoded_image_string))
        assert picture.width >= 256  # the val image with the two caption lines under it
    assert {"val/caption_0/text_summary", "val/caption_1/text_summary"} <= set(acc.Tags()["tensors"])
    records = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert len(r["captions"]) == 2
        assert all(c["truth"] and isinstance(c["generated"], str) for c in r["captions"])


def test_cut_texts_reach_the_metrics_and_saves_follow_the_clock(run):
    """Every sample's text was cut to fit: metrics.jsonl counts them (at least the 8 samples of each step so far)
    and TensorBoard has the series. With only checkpoint.every_minutes set, a checkpoint was committed at every
    step, each holding both ranks' files: the ranks took the clock's decision together."""
    rows = metrics(run)
    assert all(r["truncated"] >= 8 * r["step"] for r in rows), [r["truncated"] for r in rows]
    assert "data/truncated" in _events(run).Tags()["scalars"]
    root = run / "checkpoints"
    assert ckpt.tags(root) == [ckpt.tag_for(s) for s in range(1, STEPS + 1)]
    for tag in ckpt.tags(root):
        meta = ckpt.read_meta(root / tag)
        assert set(meta["written_by"]) == {"0", "1"} and ckpt.is_committed(root / tag, verify="crc"), tag
