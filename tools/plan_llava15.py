"""`pretrain plan` (uncalibrated) against LLaVA-1.5's published training times (8 x A100, haotian-liu/LLaVA
README, "Train"): stage 1 (558K samples, global batch 256) takes ~3.5 h for 7B and ~5.5 h for 13B on A100-80G;
stage 2 (665K samples, global batch 128) ~10 h for 7B on A100-40G and ~20 h for 13B on A100-80G. Prints the
planner's hours and its ratio to the published ones, with the recipes in configs/.

    .venv/bin/python tools/plan_llava15.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.config import load_config
from pretrain.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # name, recipe, overrides, samples, published hours, GPU
    ("stage 1, 7B", "configs/llava15_stage1.yaml", [], 558128, 3.5, "a100-80gb"),
    ("stage 1, 13B", "configs/llava15_stage1.yaml", ["model.llm=lmsys/vicuna-13b-v1.5"], 558128, 5.5, "a100-80gb"),
    ("stage 2, 7B", "configs/llava15_stage2.yaml", [], 665298, 10.0, "a100-40gb"),
    ("stage 2, 13B", "configs/llava15_stage2.yaml", ["model.llm=lmsys/vicuna-13b-v1.5"], 665298, 20.0, "a100-80gb"),
]


def main() -> int:
    print("| run | GPU | published h | planned h | planned / published | memory GiB/GPU |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, recipe, overrides, samples, hours, gpu in ROWS:
        cfg = load_config(ROOT / recipe, overrides)
        est = dict(make_plan(cfg, n_gpus=8, gpu=gpu, mfu=0.4).scaling)[8]
        planned = samples / cfg.train.global_batch_size * est.step_s / 3600
        print(f"| {name} | {gpu} | {hours:g} | {planned:.2f} | {planned / hours:.2f} | "
              f"{est.memory.total / 2**30:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
