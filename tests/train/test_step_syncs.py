"""Host synchronisations per optimizer step of the real training loop (our Trainer, a real DeepSpeed ZeRO-3
engine, gradient accumulation 2, 2 ranks, the contrastive and ITM objectives on, LoRA adapters on the decoder and
the tower), counted by pretrain.bench.syncs
and attributed to their source: the step's own code makes at most one per step when nothing is logged, two on a
logging step (the fused reduction and the grad norm DeepSpeed keeps on the device); the model (the alignment
objectives' cross-rank gather and hard-negative draw included) and PEFT's LoRA layers none."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.model import torchrun
from helpers.runs import ROOT, write_config


@pytest.mark.slow
def test_the_step_synchronises_once_per_optimizer_step(tmp_path, assets, shapes):
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{
        "train.grad_accum": 2, "train.log_every": 2, "train.max_steps": 6,
        "objectives.contrastive_weight": 0.5, "objectives.itm_weight": 0.5,
        "model.lora.r": 4, "model.lora.vision": True})
    out = tmp_path / "syncs.json"
    proc = torchrun(ROOT / "pretrain" / "bench" / "syncs.py", ["ours", str(cfg), "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    per_step = {int(k): v for k, v in report["per_step"].items()}
    print(json.dumps(report, indent=1))
    # Step n runs while the trainer's counter reads n - 1; steps 2 and 4 log, 3 and 5 do not (1 is warm-up).
    for n in (3, 5):
        assert per_step[n - 1].get("step", 0) <= 1, (n, per_step[n - 1], report["where"].get("step"))
    for n in (2, 4):
        assert per_step[n - 1].get("step", 0) <= 2, (n, per_step[n - 1], report["where"].get("step"))
    ours = report["where"]["step"]
    assert all(site.startswith(("pretrain/distributed.py", "pretrain/train/step.py")) for site in ours), ours
    # The model's forward and backward (our loss, our masks) read nothing back either.
    for n in (2, 3, 4, 5):
        assert per_step[n - 1].get("model", 0) == 0, (n, per_step[n - 1], report["where"].get("model"))
    # ... the alignment objectives included, and transformers' masks: the objectives' decoder calls pass none.
    for n in (2, 3, 4, 5):
        assert per_step[n - 1].get("transformers", 0) == 0, (n, per_step[n - 1], report["where"]["transformers"])
    # ... and PEFT's LoRA layers (they ran: the config kept them) add none.
    assert not any(site.startswith("peft/") for sites in report["where"].values() for site in sites), report["where"]
    ran = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert ran["objectives"]["contrastive_weight"] == ran["objectives"]["itm_weight"] == 0.5
    assert ran["model"]["lora"]["r"] == 4 and ran["train"]["stage"] == "full"
    # The counter is not blind: it sees DeepSpeed's own synchronisations in the same steps, and the step's one read
    # back through the layer.
    assert per_step[2].get("deepspeed", 0) > 0
    assert per_step[2]["step"] == 1 and any("pretrain/distributed.py" in site for site in ours)
