"""Rank-0 metrics: metrics.jsonl (one object per logged step), TensorBoard scalars and images, a progress bar.

TensorBoard tags: `train/<key>` for every numeric value of a metrics.jsonl record (loss, grad_norm, tokens_per_s,
samples_per_s, mfu and gpu_mem_gib on CUDA only, step_time_s, data_wait_frac, ...), plus `lr/<param group>`,
`data/skipped_<reason>`, `val/loss`, `val/perplexity` and `val/caption_<i>` (image and text).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _drop_after(path: Path, step: int) -> None:
    """Keep each step once: lines logged after the checkpoint being resumed are rewritten away (atomically)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress_bar: bool) -> None:
        self.enabled = enabled
        self.pbar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        path = run_dir / "metrics.jsonl"
        _drop_after(path, start_step)  # a run resumed after a crash redoes the steps past its checkpoint
        self.jsonl = open(path, "a", buffering=1)
        if progress_bar:
            self.pbar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def log(self, step: int, values: dict[str, Any], tb_only: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        for k, v in {**values, **(tb_only or {})}.items():
            if isinstance(v, int | float) and v is not None and math.isfinite(float(v)):
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled:
            self.tb.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def image(self, tag: str, hwc: Any, step: int) -> None:
        """An HWC uint8 picture (a val image with its generated caption)."""
        if self.enabled:
            self.tb.add_image(tag, hwc, step, dataformats="HWC")

    def advance(self, n: int, loss: float | None) -> None:
        if self.pbar is not None:
            self.pbar.update(n)
            if loss is not None:
                self.pbar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
