"""Frozen parts under ZeRO-3 (pretrain.model.frozen), on 2 CPU ranks with every parameter partitioned (no
persistence threshold): in stage finetune the frozen vision tower is never all-gathered in a training step (its
whole replica runs instead) while the trained parts are (the counter is not blind), and a resume from a checkpoint
continues to the same loss. The run with `deepspeed.frozen_unpartitioned=false` (the tower gathered at every
micro-batch, the same losses, more bytes per step) is measured by tools/zero3_gathers.py into benchmarks/RESULTS.md
rather than run here: one more 2-rank run would cost the suite ~11 s."""

from __future__ import annotations

import json

import pytest
from helpers.model import torchrun
from helpers.runs import ROOT, write_config

from pretrain.model.tiny import write_tiny_vision

TOOL = ROOT / "tools" / "zero3_gathers.py"


def _gathers(tmp_path, assets, shapes, name: str, *args: str, **overrides) -> dict:
    (tmp_path / name).mkdir()
    cfg = write_config(tmp_path / name / "c.yaml", assets, shapes, **{
        "train.max_steps": 2, "train.grad_accum": 2, "deepspeed.param_persistence_threshold": 0, **overrides})
    out = tmp_path / name / "gathers.json"
    proc = torchrun(TOOL, [str(cfg), "--out", str(out), *args], timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _gathered(report: dict, part: str) -> int:
    return sum(n for name, n in report["params"].items() if part in name)


@pytest.mark.slow
def test_finetune_never_gathers_the_frozen_tower_and_trains_alike(tmp_path, assets, shapes):
    on = _gathers(tmp_path, assets, shapes, "on", "--save", **{"train.stage": "finetune",
                                                                "checkpoint.every_steps": 1})
    print(json.dumps(on["per_step"]))
    assert _gathered(on, "vision_tower") == 0, on["params"]
    # Not blind: the trained parts are gathered, at every micro-batch of both steps.
    assert _gathered(on, "language_model") > 0 and _gathered(on, "multi_modal_projector") > 0, on["params"]
    assert all(on["per_step"][step]["bytes"] > 0 for step in ("0", "1")), on["per_step"]
    assert len(on["losses"]) == 2
    # Exact resume with the replica: from the step-1 checkpoint, step 2 trains to the same loss, although the
    # resumed run builds its tower from other weights (another random CLIP of the same shape): the checkpoint's
    # tower is loaded into the partitioned one, and the replica must be made again from it, not kept from the build.
    step1 = tmp_path / "on" / "run" / "checkpoints" / "step_00000001"
    other = write_tiny_vision(tmp_path / "other_clip", "clip", seed=1)
    resumed = _gathers(tmp_path, assets, shapes, "resumed", **{
        "train.stage": "finetune", "checkpoint.resume": str(step1), "model.vision": str(other),
        "checkpoint.allow_config_change": True})
    assert resumed["losses"] == on["losses"][1:]
    assert _gathered(resumed, "vision_tower") == 0
