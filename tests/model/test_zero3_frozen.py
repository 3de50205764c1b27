"""Frozen parts under ZeRO-3 (pretrain.model.frozen), on 2 CPU ranks with every parameter partitioned (no
persistence threshold): in stage finetune the frozen vision tower is never all-gathered in a training step (its
whole replica runs instead), while the same run with `deepspeed.frozen_unpartitioned=false` gathers it at every
micro-batch; the losses of the two are the same, fewer bytes are gathered per step, and a resume from a checkpoint
continues to the same loss."""

from __future__ import annotations

import json

from helpers.model import torchrun
from helpers.runs import ROOT, write_config

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


def test_finetune_never_gathers_the_frozen_tower_and_trains_alike(tmp_path, assets, shapes):
    on = _gathers(tmp_path, assets, shapes, "on", "--save", **{"train.stage": "finetune",
                                                                "checkpoint.every_steps": 1})
    off = _gathers(tmp_path, assets, shapes, "off", **{"train.stage": "finetune",
                                                      "deepspeed.frozen_unpartitioned": False})
    print(json.dumps({"on": on["per_step"], "off": off["per_step"]}))
    # The old path gathers the tower at every micro-batch (the counter sees it), the new one never.
    assert _gathered(off, "vision_tower") >= 2 * 2 * 2, off["params"]
    assert _gathered(on, "vision_tower") == 0, on["params"]
    # Not blind: the trained parts are gathered in both.
    for report in (on, off):
        assert _gathered(report, "language_model") > 0 and _gathered(report, "multi_modal_projector") > 0
    for step in ("0", "1"):
        assert on["per_step"][step]["bytes"] < off["per_step"][step]["bytes"], (on["per_step"], off["per_step"])
    assert len(on["losses"]) == 2
    assert on["losses"] == off["losses"]
    # Exact resume with the replica: from the step-1 checkpoint, step 2 trains to the same loss.
    step1 = tmp_path / "on" / "run" / "checkpoints" / "step_00000001"
    resumed = _gathers(tmp_path, assets, shapes, "resumed", **{"train.stage": "finetune",
                                                              "checkpoint.resume": str(step1)})
    assert resumed["losses"] == on["losses"][1:]
    assert _gathered(resumed, "vision_tower") == 0
