"""One process (world size 1) training a LoRA config for 2 steps under ZeRO 0, 1 and 2 in turn, with our Trainer;
prints one JSON line: per stage, the losses, the trainable parameter names and element count, and the Adam state
elements the optimizer holds (DeepSpeed's ZeRO-1/2 optimizer wraps torch AdamW around flat fp32 partitions).

    python tests/helpers/lora_stages_worker.py CONFIG OUT_ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pretrain import distributed
from pretrain.config import load_config
from pretrain.train.trainer import Trainer


def adam_elements(engine) -> int:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


def main(config: str, out_root: str) -> None:
    report = {}
    for stage in (0, 1, 2):
        cfg = load_config(config, [f"deepspeed.zero_stage={stage}", f"run.output_dir={out_root}/z{stage}"])
        trainer = Trainer(cfg)
        assert trainer.fit() == 0
        module = trainer.engine.module
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        losses = [json.loads(line)["loss"] for line in
                  (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
        report[stage] = {"losses": losses, "trainable": names, "adam": adam_elements(trainer.engine),
                         "numel": sum(p.numel() for p in module.parameters() if p.requires_grad)}
        trainer.engine.destroy()
    print("STAGES " + json.dumps(report), flush=True)
    distributed.finish(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
