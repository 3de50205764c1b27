"""Resuming on another number of ranks or ZeRO stage: DeepSpeed's universal checkpoint.

A native ZeRO checkpoint holds each rank's flat partition of the fp32 weights and optimizer state; it loads only at
the data-parallel size it was written with. `deepspeed.checkpoint.ds_to_universal` rewrites it as one file per
parameter and state (`zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt` + the model-states files with the client state and
the LR scheduler), which any number of ranks re-partitions on load with `"checkpoint": {"load_universal": true}`.

The conversion runs once, on rank 0, into `<checkpoint>/universal` (written under a temporary name and renamed when
complete, so a conversion killed half-way is redone, never half-used); the other ranks wait for it in the
rendezvous store (distributed.rank0_work), not in a collective that would time out, and take its word that it is
complete. The checkpoint's own files and its commit marker are left as they are.

Optimizer state survives exactly (the same fp32 numbers, re-partitioned); losses after the resume still differ from
a run that kept its ranks: the loader splits the rest of the epoch over the new ranks (pretrain.data.elastic), so
batches hold other samples, and sums are reduced in another order. The rest of the checkpoint: pretrain.train.resume.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pretrain import distributed

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
_DONE = "CONVERTED"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be loaded with this run's ranks or ZeRO stage."""


def needs_universal(meta: dict[str, Any], world: int, zero_stage: int) -> bool:
    """Whether a committed checkpoint (its COMMITTED meta) must go through the universal format to load here."""
    old_world, old_stage = meta.get("world_size"), meta.get("zero_stage")
    if old_world == world and old_stage == zero_stage:
        return False
    if old_stage == 0 and zero_stage == 0:
        return False  # no partitioning: every rank holds the whole optimizer state, any world size loads it
    if 0 in (old_stage, zero_stage):
        raise ResumeError(f"checkpoint written with ZeRO stage {old_stage} on {old_world} rank(s) cannot be resumed "
                          f"with stage {zero_stage} on {world}: the universal format needs ZeRO 1-3 on both sides")
    return True


def prepare(ckpt_dir: Path | None, meta: dict[str, Any], world: int, zero_stage: int, rank: int,
            timeout_minutes: float) -> bool:
    """Whether the engine loads `ckpt_dir` (COMMITTED `meta`) through the universal format, converted first where
    it must be. All ranks call it, before the engine exists: the converter reads whole checkpoints into memory."""
    if ckpt_dir is None or not needs_universal(meta, world, zero_stage):
        return False
    convert(ckpt_dir, rank, timeout_minutes)
    return True


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / UNIVERSAL


def convert(ckpt_dir: Path, rank: int, timeout_minutes: float) -> Path:
    """Rank 0 converts (unless a complete conversion is there); every rank returns the universal directory once it
    is complete. All ranks must call it; the others wait up to `timeout_minutes` (distributed.rank0_work: no collective
    times out during a long conversion)."""
    out = universal_dir(ckpt_dir)

    def work() -> str:
        try:
            if not (out / _DONE).is_file():
                _convert(Path(ckpt_dir), out)
        except OSError as err:
            return str(err)
        return "" if (out / _DONE).is_file() else f"{out / _DONE} missing after the conversion"

    error = distributed.rank0_work(work, rank, timeout_minutes)
    if error:
        raise ResumeError(f"could not convert {ckpt_dir} to DeepSpeed's universal format: {error}")
    return out


def _convert(src: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    # A separate process: the converter forks worker pools, which a process holding NCCL/gloo threads should not.
    # --inject_missing_state: ZeRO-1/2 checkpoints of a plain (non-Megatron) model lack the version record the
    # converter asserts on; it only adds that record.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]
    log.warning("converting checkpoint %s to DeepSpeed's universal format in %s (it was written by another number "
                "of ranks or ZeRO stage)", src, out)
    tmp.mkdir(parents=True)
    log_path = tmp.parent / "universal.log"
    with open(log_path, "w") as logf:
        done = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise OSError(f"ds_to_universal exited with {done.returncode} (log: {log_path}):\n{tail}")
    (tmp / _DONE).write_text("ok\n")
    tmp.rename(out)
