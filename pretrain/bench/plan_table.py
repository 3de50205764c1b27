"""Plan vs measured: the `pretrain bench train --json` results of the bench recipes next to what `pretrain plan`
predicts for one GPU, one table row per result (the driver is tools/bench_table.py; tools/gpu_bench.sh prints the
table last).

Each RESULT.json is the last line of `pretrain bench train --config configs/bench/NAME.yaml --json`. The plan is
made for the measured sample length (tokens per sample) twice: at the measured MFU (so the step time must agree
unless the FLOPs model is off) and at the planner's default assumption of 40% (what a user sees before measuring);
its memory is compared with the measured peak.
"""

from __future__ import annotations

import re
from pathlib import Path

from pretrain.bench.report import markdown_table
from pretrain.config import load_config
from pretrain.plan.planner import make_plan

HEADER = ["recipe", "device", "ours tok/s", "MFU", "peak GiB", "data wait", "peer tok/s", "ours/peer",
          "plan tok/s @ measured MFU", "plan tok/s @ 40%", "plan GiB", "plan/measured GiB"]


def _gpu_key(device: str) -> str | None:
    name = device.lower()
    return "h200" if "h200" in name else "h100" if "h100" in name else None


def _recipe(command: str) -> str:
    m = re.search(r"--config\s+(\S+)", command)
    if not m:
        raise ValueError(f"no --config in {command!r}")
    return m.group(1)


def row(result: dict) -> list:
    train, env = result["train"], result["environment"]
    config = _recipe(env["command"])
    ours, peer = train["ours"], train.get("peer")
    cfg = load_config(config)
    sample_len = round(ours["tokens_per_s"] / ours["samples_per_s"])
    gpu = _gpu_key(train["device"])
    plan_measured = plan_default = plan_mem = None
    if gpu is not None:
        n = train["nproc"]
        stage = cfg.deepspeed.zero_stage
        default = make_plan(cfg, n_gpus=n, gpu=gpu, mfu=0.4, sample_len=min(sample_len, cfg.data.max_length))
        plan_default = _tokens_per_s(default, n)
        plan_mem = default.by_stage[stage].total / 2**30
        if ours["mfu"]:
            measured = make_plan(cfg, n_gpus=n, gpu=gpu, mfu=ours["mfu"],
                                 sample_len=min(sample_len, cfg.data.max_length))
            plan_measured = _tokens_per_s(measured, n)
    ratio = train.get("ratio", {}).get("tokens_per_s")
    return [Path(config).stem, train["device"], ours["tokens_per_s"],
            None if ours["mfu"] is None else f"{100 * ours['mfu']:.1f}%", ours["gpu_mem_gib"],
            f"{100 * ours['data_wait_frac']:.1f}%", peer and peer["tokens_per_s"],
            None if ratio is None else f"{ratio:.2f}x", plan_measured, plan_default, plan_mem,
            None if plan_mem is None or not ours["gpu_mem_gib"] else f"{plan_mem / ours['gpu_mem_gib']:.2f}"]


def _tokens_per_s(plan, n_gpus: int) -> float | None:
    est = dict(plan.scaling).get(n_gpus)
    return None if est is None else est.tokens_per_s_per_gpu * n_gpus


def table(results: list[dict]) -> str:
    """The markdown table of `results` (each the last line of `pretrain bench train --json`, parsed)."""
    return markdown_table(HEADER, [row(r) for r in results])
