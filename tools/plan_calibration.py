"""Does `pretrain plan --calibrate` predict runs it was not fitted on? Trains a small VLM on the demo's data on CPU
(the demo recipe with a wider, deeper decoder, so that a step's time is mostly its FLOPs) in a few variants
(max_length, packing, micro-batch, activation checkpointing), calibrates the planner on two of them, the lightest and
the heaviest step (so that the fit interpolates: `--every-pair` shows every other choice), and prints a
markdown table of predicted against measured step time for every variant, at each step-time quantile asked for
(the median, and a lower one: on a shared machine contention only ever lengthens a step).

    .venv/bin/python tools/plan_calibration.py --out /tmp/plancal [--steps 30] [--nproc 1] [--quantiles 0.5 0.2]
        [--every-pair]

Each variant is one `pretrain train` (or `pretrain launch --nproc N`) of configs/demo.yaml on the demo's synthetic
shards, logging every step; the planner drops the first logged step (start-up). Runs already finished in --out are
reused. Timings on a shared machine are noisy: the table says how much the measured steps spread (interquartile
range over median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# name -> overrides of the demo recipe; CALIBRATION's runs calibrate, every row is predicted.
BASE = {"data.max_length": 128, "data.packing": True, "train.micro_batch_size": 8,
        "model.activation_checkpointing": "none", "objectives.contrastive_weight": 0.0}
DECODER = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4}
VARIANTS: dict[str, dict] = {
    "base": {},
    "max_length 64": {"data.max_length": 64},
    "max_length 256": {"data.max_length": 256},
    "packing off": {"data.packing": False},
    "micro-batch 16": {"train.micro_batch_size": 16},
    "checkpointing full": {"model.activation_checkpointing": "full"},
    "all four changed": {"data.max_length": 96, "data.packing": False, "train.micro_batch_size": 16,
                         "model.activation_checkpointing": "full"},
}
# The lightest and the heaviest step of the set (5.5 and 47 GFLOP): the fit interpolates between them, where two
# runs of near work would extrapolate their difference (`--every-pair` shows how much that costs).
CALIBRATION = ("packing off", "micro-batch 16")

def train(out: Path, name: str, overrides: dict, paths: dict, steps: int, nproc: int, round_: int) -> Path:
    run_dir = out / f"{name.replace(' ', '_')}_r{round_}"
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


def step_times(run_dirs: list[Path]) -> list[float]:
    """Every round's steps but each run's first (start-up)."""
    out: list[float] = []
    for d in run_dirs:
        out += [json.loads(line)["step_time_s"] for line in (d / "metrics.jsonl").read_text().splitlines()][1:]
    return out


def predict(overrides: dict, paths: dict, calibration: list[Path], world: int, quantile: float) -> dict:
    from pretrain.config import load_config
    from pretrain.plan import calibrated_plan

    cfg = load_config(DEMO, [f"{k}={v}" for k, v in {**paths, **BASE, **overrides}.items()])
    return calibrated_plan(cfg, [str(c) for c in calibration], n_gpus=world, quantile=quantile).calibrated


def every_pair(runs: dict[str, list[Path]], paths: dict, nproc: int) -> None:
    """Each pair of variants as the calibration (median step times): its worst error over the other variants."""
    measured = {name: float(np.median(step_times(dirs))) for name, dirs in runs.items()}
    rows = []
    for pair in itertools.combinations(VARIANTS, 2):
        calibration = [d for name in pair for d in runs[name]]
        errors = {name: predict(o, paths, calibration, nproc, 0.5)["step_time_s"] / measured[name] - 1
                  for name, o in VARIANTS.items() if name not in pair}
        worst = max(errors, key=lambda name: abs(errors[name]))
        rows.append((abs(errors[worst]), pair, worst, errors[worst]))
    print("\n| calibrated on | worst held-out variant | its error |\n| --- | --- | ---: |")
    for _, pair, worst, error in sorted(rows):
        print(f"| {' + '.join(pair)} | {worst} | {error:+.1%} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.2])
    p.add_argument("--rounds", type=int, default=2,
                   help="every variant runs once per round, rounds one after the other, so that a change in the "
                   "machine's load spreads over all variants instead of landing on the last ones")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--samples", type=int, default=800, help="synthetic training samples")
    p.add_argument("--every-pair", action="store_true",
                   help="also calibrate on every pair of variants and print each pair's worst held-out error")
    args = p.parse_args()
    from pretrain.demo import prepare, tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer, write_tiny_decoder

    args.out.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.out.resolve(), args.samples, 16)
    tok = build_tokenizer(tokenizer_corpus(), vocab_size=400)
    paths["model.llm"] = str(write_tiny_decoder(args.out.resolve() / "assets" / "llm_wide", tok, "llama", **DECODER))
    runs: dict[str, list[Path]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, o in VARIANTS.items():
            runs[name].append(train(args.out, name, o, paths, args.steps, args.nproc, r))
    calibration = [d for name in CALIBRATION for d in runs[name]]
    for q in args.quantiles:
        print(f"\nstep-time quantile {q:g}, calibrated on: {', '.join(CALIBRATION)}\n")
        print("| run | overrides | measured s | spread (IQR/median) | predicted s | error |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name, o in VARIANTS.items():
            c = predict(o, paths, calibration, args.nproc, q)
            times = step_times(runs[name])
            quartiles = statistics.quantiles(times, n=4)
            measured = float(np.quantile(times, q))
            words = " ".join(f"{k}={v}" for k, v in o.items()) or "-"
            label = f"{name} (calibration)" if name in CALIBRATION else name
            print(f"| {label} | {words} | {measured:.4f} | {(quartiles[2] - quartiles[0]) / quartiles[1]:.0%} | "
                  f"{c['step_time_s']:.4f} | {c['step_time_s'] / measured - 1:+.1%} |", flush=True)
        print("\ncoefficients:", json.dumps(c["coefficients"]))
    if args.every_pair:
        every_pair(runs, paths, args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
