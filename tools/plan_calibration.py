"""Does `pretrain plan --calibrate` predict runs it was not fitted on? Trains the tiny demo VLM on CPU in a few
variants (max_length, packing, micro-batch, activation checkpointing), calibrates the planner on two of them and
prints a markdown table of predicted against measured median step time for every variant.

    .venv/bin/python tools/plan_calibration.py --out /tmp/plancal [--steps 30] [--nproc 1]

Each variant is one `pretrain train` (or `pretrain launch --nproc N`) of configs/demo.yaml on the demo's synthetic
shards, logging every step; the planner drops the first logged step (start-up). Timings on a shared machine are
noisy: the table says how much the measured steps spread (interquartile range over median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# name -> overrides of the demo recipe; the first two calibrate, every row is predicted.
BASE = {"data.max_length": 64, "data.packing": True, "train.micro_batch_size": 4,
        "model.activation_checkpointing": "none"}
VARIANTS: dict[str, dict] = {
    "base (calibration)": {},
    "other mix (calibration)": {"data.max_length": 96, "data.packing": False, "train.micro_batch_size": 8,
                                "model.activation_checkpointing": "full"},
    "max_length 128": {"data.max_length": 128},
    "packing off": {"data.packing": False},
    "micro-batch 8": {"train.micro_batch_size": 8},
    "checkpointing full": {"model.activation_checkpointing": "full"},
}
CALIBRATION = ("base (calibration)", "other mix (calibration)")


def train(out: Path, name: str, overrides: dict, paths: dict, steps: int, nproc: int) -> Path:
    run_dir = out / name.split(" (")[0].replace(" ", "_")
    if (run_dir / "DONE").exists():
        return run_dir
    words = [f"{k}={v}" for k, v in {**paths, **BASE, **overrides}.items() if k != "run.output_dir"]
    words += [f"run.output_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=1", "train.val_every=0",
              "checkpoint.every_steps=0", "train.warmup_steps=0", "data.num_workers=1"]
    cmd = [sys.executable, "-m", "pretrain", "train", str(DEMO), *words] if nproc == 1 else \
        [sys.executable, "-m", "pretrain", "launch", str(DEMO), "--nproc", str(nproc), *words]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def spread(run_dir: Path) -> float:
    times = [json.loads(line)["step_time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / statistics.median(times)


def predict(config: Path, overrides: dict, paths: dict, calibration: list[Path], world: int) -> dict:
    words = [f"{k}={v}" for k, v in {**paths, **BASE, **overrides}.items()]
    cmd = [sys.executable, "-m", "pretrain", "plan", str(config), *words, "--json", "--gpus", str(world),
           "--calibrate", *map(str, calibration)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["calibrated"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--samples", type=int, default=800, help="synthetic training samples")
    args = p.parse_args()
    from pretrain.demo import prepare

    args.out.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.out.resolve(), args.samples, 16)
    runs = {name: train(args.out, name, o, paths, args.steps, args.nproc) for name, o in VARIANTS.items()}
    calibration = [runs[name] for name in CALIBRATION]
    print("| run | overrides | measured s (median) | spread (IQR/median) | predicted s | error |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, o in VARIANTS.items():
        c = predict(DEMO, o, paths, calibration, args.nproc)
        measured = statistics.median(json.loads(line)["step_time_s"] for line in
                                     (runs[name] / "metrics.jsonl").read_text().splitlines()[1:])
        words = " ".join(f"{k}={v}" for k, v in o.items()) or "-"
        print(f"| {name} | {words} | {measured:.4f} | {spread(runs[name]):.0%} | {c['step_time_s']:.4f} | "
              f"{c['step_time_s'] / measured - 1:+.1%} |", flush=True)
    print("coefficients:", json.dumps(c["coefficients"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
