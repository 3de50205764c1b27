"""Rank-0 metrics: metrics.jsonl (one object per logged step), the trackers of `run.trackers` (TensorBoard, W&B,
MLflow: pretrain.train.trackers), a progress bar, and resumes.jsonl (one line per resume: the report marks them).

Tracker tags: `train/<key>` for every numeric value of a metrics.jsonl record (loss, grad_norm, tokens_per_s,
samples_per_s, mfu and gpu_mem_gib on CUDA only, step_time_s, data_wait_frac, ...), plus `lr/<param group>`,
`data/skipped_<reason>`, `val/loss`, `val/perplexity` and `val/caption_<i>` (image and text).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretrain.atomic_file import write_atomic
from pretrain.train.trackers import CLOSE_TIMEOUT_S, Background, open_trackers

METRICS = "metrics.jsonl"
RESUMES = "resumes.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _drop_after(path: Path, step: int) -> int:
    """Keep each step once: lines logged after the checkpoint being resumed are rewritten away (atomically).
    Returns the last step the file held before."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    steps = [json.loads(ln).get("step", 0) if ln.strip() else None for ln in lines]
    kept = [ln for ln, s in zip(lines, steps) if s is not None and s <= step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))
    return max((s for s in steps if s is not None), default=0)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, under their tracker tags (`train/<key>` unless the key has a group)."""
    return {k if "/" in k else f"train/{k}": float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


class MetricsWriter:
    """One home for a logged step: metrics.jsonl, then every tracker with the same steps and values."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress_bar: bool,
                 trackers: list[str] = ("tensorboard",), config: dict[str, Any] | None = None,
                 run_ids: dict[str, str] | None = None) -> None:
        self.enabled = enabled
        self.pbar = None
        self.jsonl = None
        self.sinks: list[Any] = []
        if not enabled:
            return
        path = run_dir / METRICS
        logged = _drop_after(path, start_step)  # a run resumed after a crash redoes the steps past its checkpoint
        if start_step:
            _drop_after(run_dir / RESUMES, start_step)
            with open(run_dir / RESUMES, "a") as f:
                f.write(json.dumps({"step": start_step, "logged_through": logged, "time": time.time()}) + "\n")
        self.jsonl = open(path, "a", buffering=1)
        config_yaml = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
        self.sinks = open_trackers(list(trackers), run_dir, start_step, logged, config or {}, config_yaml,
                                   (config or {}).get("run", {}).get("name", run_dir.name), run_ids or {})
        if progress_bar:
            self.pbar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def log(self, step: int, values: dict[str, Any], trackers_only: dict[str, float] | None = None) -> None:
        """One metrics.jsonl record; the trackers also get `trackers_only` (per-group rates, skips per reason)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.scalars(step, _numbers({**values, **(trackers_only or {})}))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.scalars(step, values)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars(step, {tag: value})

    def caption(self, tag: str, image: Any, text: str, step: int) -> None:
        """An HWC uint8 picture (a val image with its generated caption) and its caption as Markdown."""
        for sink in self.sinks:
            sink.caption(step, tag, image, text)

    def run_ids(self) -> dict[str, str]:
        """The W&B / MLflow runs this run logs to, for the checkpoint (a resumed run continues them)."""
        return {k: v for sink in self.sinks for k, v in sink.resume_ids().items()}

    def advance(self, n: int, loss: float | None) -> None:
        if self.pbar is not None:
            self.pbar.update(n)
            if loss is not None:
                self.pbar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for sink in self.sinks:
            if isinstance(sink, Background):
                sink.close(deadline)
            else:
                sink.close()
