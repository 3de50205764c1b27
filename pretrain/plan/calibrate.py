"""`pretrain plan --calibrate`: the step-time model's hardware coefficients fitted to measured runs.

A step on one rank costs  hardware FLOPs / R  +  collective calls x c  +  f  (plus byte traffic not hidden and host
optimizer work, modelled apart): R the FLOP rate the hardware achieves on this kind of work (padding and the
re-forward of activation checkpointing included), c the cost of one collective call (ZeRO-3 gathers a module's
weights per call: latency, hooks, bookkeeping), f a fixed cost per optimizer step (optimizer, host sync, logging).
The FLOPs and the call counts come from the planner's model of each run's own config and data (pretrain.plan.
workload, pretrain.plan.comm); R, c and f are fitted by non-negative least squares, each run contributing a quantile
of its logged step times (the first window, which holds start-up, is dropped): the median by default; on a shared
machine a lower one, since contention only ever lengthens a step. Memory: the model's per-rank bytes plus one fitted
constant, the runtime's own overhead (CUDA context and allocator, or the host process on CPU).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config import Config, ConfigError, load_config
from pretrain.plan.comm import collective_calls
from pretrain.plan.estimate import GIB, memory_per_gpu
from pretrain.plan.workload import Workload

COEFFICIENTS = ("seconds_per_flop", "call_s", "fixed_step_s")
WARMUP_WINDOWS = 1  # logged windows dropped at the start of a run: compilation, allocator growth, first batches
MEMORY_KEYS = ("gpu_mem_gib", "host_peak_rss_gib")  # what metrics.jsonl records as the rank's peak memory


@dataclass(frozen=True)
class RunMeasurement:
    """One run directory's config and what it measured after warm-up."""

    run_dir: Path
    cfg: Config
    world_size: int
    step_times: tuple[float, ...]  # step_time_s of each logged window
    tokens_per_s: tuple[float, ...]
    peak_memory_gib: float | None

    def step_time_s(self, quantile: float = 0.5) -> float:
        """The `quantile` of the logged step times (0.5: the median)."""
        return float(np.quantile(self.step_times, quantile))


def read_run(run_dir: str | Path) -> RunMeasurement:
    """A run directory's config.yaml, ds_config.json (its world size) and metrics.jsonl; ConfigError naming what is
    missing when the directory holds no usable measurement."""
    d = Path(run_dir)
    metrics, config, ds_config = d / "metrics.jsonl", d / "config.yaml", d / "ds_config.json"
    for path in (config, metrics, ds_config):
        if not path.is_file():
            raise ConfigError(f"--calibrate {d}: no {path.name} (not a run directory, or the run logged nothing)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [r for r in records if r.get("step_time_s")]
    if len(timed) <= WARMUP_WINDOWS:
        raise ConfigError(f"--calibrate {d}: metrics.jsonl has {len(timed)} logged step(s) with step_time_s; "
                          f"need more than {WARMUP_WINDOWS} (the first window is warm-up): train longer or log "
                          "more often (train.log_every)")
    kept = timed[WARMUP_WINDOWS:]
    ds = json.loads(ds_config.read_text())
    per_rank = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    memory = [r[k] for r in records for k in MEMORY_KEYS if r.get(k) is not None]
    return RunMeasurement(d, load_config(config), ds["train_batch_size"] // per_rank,
                          tuple(r["step_time_s"] for r in kept), tuple(r["tokens_per_s"] for r in kept),
                          max(memory) if memory else None)


def step_features(work: Workload, cfg: Config, world_size: int) -> tuple[float, float, float]:
    """(hardware FLOPs, collective calls, 1) of one optimizer step on one rank: what R, c and f multiply."""
    return (work.hardware_flops() * work.grad_accum, collective_calls(work, cfg.deepspeed, world_size), 1.0)


@dataclass(frozen=True)
class StepFit:
    seconds_per_flop: float
    call_s: float
    fixed_step_s: float
    fitted: tuple[str, ...]  # the coefficients the data determined; the others are held at 0
    rms_s: float  # residual over the logged steps

    @property
    def flops_per_s(self) -> float:
        return 1.0 / self.seconds_per_flop

    def predict(self, features: tuple[float, float, float]) -> float:
        return float(np.dot((self.seconds_per_flop, self.call_s, self.fixed_step_s), features))


def fit_step_time(features: list[tuple[float, float, float]], seconds: list[float]) -> StepFit:
    """Non-negative least squares of `seconds` on `features` (one row per measurement).

    Every subset of the coefficients that holds the FLOP term is solved; a subset is admissible when the runs
    determine it (as many distinct feature rows as coefficients, none negative). The smallest residual wins,
    fewer coefficients on a tie, and among equals the order of COEFFICIENTS (a cost that two runs cannot tell apart
    from a fixed one is put on the calls, which a config changes, rather than on the step)."""
    x, y = np.asarray(features, dtype=float), np.asarray(seconds, dtype=float)
    if len(x) == 0:
        raise ConfigError("--calibrate: no measured step to fit")
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    distinct = np.unique(x / scale, axis=0)
    best: tuple[float, tuple[int, ...], np.ndarray] | None = None
    for size in (1, 2, 3):
        for cols in itertools.combinations(range(3), size):
            if 0 not in cols or np.linalg.matrix_rank(distinct[:, cols]) < size:
                continue
            coef, *_ = np.linalg.lstsq(x[:, cols] / scale[list(cols)], y, rcond=None)
            if (coef < 0).any() or coef[0] <= 0:
                continue
            rms = float(np.sqrt(np.mean((x[:, cols] / scale[list(cols)] @ coef - y) ** 2)))
            if best is None or rms < best[0] * (1 - 1e-9) - 1e-15:
                best = (rms, cols, coef / scale[list(cols)])
    if best is None:
        raise ConfigError("--calibrate: the runs' step times do not grow with their FLOPs; no positive FLOP rate "
                          "fits them (calibrate on runs that differ in work, e.g. micro-batch or max_length)")
    rms, cols, coef = best
    full = [0.0, 0.0, 0.0]
    for c, v in zip(cols, coef, strict=True):
        full[c] = float(v)
    return StepFit(*full, tuple(COEFFICIENTS[c] for c in cols), rms)


def fit_memory_overhead(modelled_gib: list[float], measured_gib: list[float]) -> float:
    """The constant that, added to the model's bytes, fits the measured peaks best in least squares: their mean
    difference (the runtime's own memory, which the model does not count)."""
    if not measured_gib:
        raise ConfigError("--calibrate: no run recorded its peak memory")
    return float(np.mean(np.subtract(measured_gib, modelled_gib)))


def modelled_memory_gib(work: Workload, cfg: Config, world_size: int) -> float:
    """The model's bytes per rank without any runtime overhead."""
    return memory_per_gpu(work, cfg.deepspeed, world_size, overhead_gib=0.0).total / GIB


def as_dict(fit: StepFit, memory_overhead_gib: float | None) -> dict[str, Any]:
    return {"flops_per_s": fit.flops_per_s, "call_s": fit.call_s, "fixed_step_s": fit.fixed_step_s,
            "fitted": list(fit.fitted), "rms_s": fit.rms_s, "memory_overhead_gib": memory_overhead_gib}
