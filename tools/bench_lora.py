"""LoRA vs full fine-tuning on the demo recipe at stage finetune, ZeRO-3 on 2 CPU ranks: trainable parameters,
optimizer-state bytes per rank (every tensor in that rank's optimizer shard: fp32 master partition and Adam moments),
median step time, and bytes all-gathered per step (tools/zero3_gathers.py, which runs our Trainer).

    python tools/bench_lora.py OUT_DIR [--steps 12] [--r 8]

Prints one JSON object per variant and a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def measure(run_dir: Path, gathers: dict) -> dict[str, Any]:
    tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    per_rank = [tensor_bytes(torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"])
                for p in sorted(tag.glob("*_optim_states.pt"))]
    model0 = torch.load(next(tag.glob("zero_pp_rank_0_*_model_states.pt")), map_location="cpu", weights_only=False)
    trainable = sum(s.numel() for group in model0["param_shapes"] for s in group.values())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[2:] if r.get("step_time_s")]  # past the first steps' warm-up
    steps = gathers["per_step"]
    later = [v["bytes"] for k, v in steps.items() if int(k) >= 2] or [v["bytes"] for v in steps.values()]
    return {"trainable_params": trainable, "optimizer_bytes_per_rank": per_rank,
            "median_step_s": statistics.median(times) if times else None,
            "gathered_bytes_per_step": statistics.median(later), "final_loss": rows[-1]["loss"]}


def run(out: Path, name: str, overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    from pretrain.config import load_config, save_config
    from pretrain.demo import prepare

    base = prepare(out / "demo", 256, 16) if not (out / "demo" / "assets").exists() else None
    if base is not None:
        (out / "demo_overrides.json").write_text(json.dumps(base))
    base = json.loads((out / "demo_overrides.json").read_text())
    settings = {**base, "run.output_dir": str(out / name), "train.stage": "finetune", "train.max_steps": steps,
                "train.log_every": 1, "train.val_every": 0, "checkpoint.every_steps": steps,
                "train.progress_bar": False, "deepspeed.zero_stage": 3, "train.lr_multipliers": {},
                **overrides}
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    save_config(cfg, out / f"{name}.yaml")
    report = out / f"{name}.gathers.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
           str(ROOT / "tools" / "zero3_gathers.py"), str(out / f"{name}.yaml"), "--out", str(report), "--save"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return measure(out / name, json.loads(report.read_text()))


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/bench_lora.py")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--r", type=int, default=8)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"full": run(out, "full", {}, args.steps),
               "lora": run(out, "lora", {"model.lora.r": args.r, "model.lora.alpha": 2 * args.r}, args.steps)}
    print(json.dumps(results, indent=1))
    print("| variant | trainable params | optimizer state per rank (bytes) | median step (s) | gathered per step "
          "(bytes) | loss at last step |\n| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['trainable_params']:,} | {' / '.join(f'{b:,}' for b in r['optimizer_bytes_per_rank'])} "
              f"| {r['median_step_s']:.3f} | {r['gathered_bytes_per_step']:,.0f} | {r['final_loss']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
