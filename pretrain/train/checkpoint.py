"""Sharded checkpoints that count only once complete.

Layout: `checkpoints/<tag>/` holds DeepSpeed's files (saved with save_latest=False), one `trainer_rank<r>.pt` per
rank (loader position and RNG states), and `COMMITTED`, written by rank 0 last, after every rank has written and
reported its files: it lists every file with its size as the rank that wrote it reported it. `checkpoints/latest`
(the tag as text, DeepSpeed's own format, so its tools read it too) is replaced atomically only after that. A save
killed half-way leaves a tag without COMMITTED; `latest` still names the previous one, and `resume: auto` passes
over the incomplete one with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
LATEST = "latest"
HF_META = "hf_meta"  # Llava config + tokenizer + image processor, for export


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rank_state(ckpt_dir: Path, rank: int, state: dict[str, Any]) -> Path:
    path = ckpt_dir / f"trainer_rank{rank:05d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def read_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any] | None:
    path = Path(ckpt_dir) / f"trainer_rank{rank:05d}.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def commit(root: Path, tag: str, meta: dict[str, Any], reports: list[dict[str, int]] | None = None) -> None:
    """Rank 0, once every rank has written: the marker, then `latest`.

    `reports[r]` is what rank r says it wrote ({name: size}, pretrain.train.shared_fs.WrittenFiles); the marker
    lists those, so a file another node wrote counts even where rank 0's directory cache does not show it yet.
    Rank 0's own listing adds the files it wrote outside the reports (the export metadata, DeepSpeed's scripts)."""
    ckpt_dir = root / tag
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != COMMIT_MARKER}
    written_by = {}
    for rank, report in enumerate(reports or []):
        files.update(report)
        written_by[str(rank)] = sorted(report)
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_dir():
            _fsync_dir(p)
    marker = {**meta, "tag": tag, "time": time.time(), "files": dict(sorted(files.items()))}
    if written_by:
        marker["written_by"] = written_by
    _atomic_write(ckpt_dir / COMMIT_MARKER, json.dumps(marker, indent=1))
    _atomic_write(root / LATEST, tag)


def is_committed(ckpt_dir: Path) -> bool:
    """Committed and intact: the marker exists and every listed file is there with its size."""
    marker = ckpt_dir / COMMIT_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, OSError):
        return False
    return all((ckpt_dir / name).is_file() and (ckpt_dir / name).stat().st_size == size for name, size in
               files.items())


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / COMMIT_MARKER).read_text())


def tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=step_of)


def find_resume(root: Path) -> Path | None:
    """The newest committed, intact checkpoint; warns about newer incomplete or corrupt ones it passes over."""
    latest_file = root / LATEST
    named = latest_file.read_text().strip() if latest_file.is_file() else None
    for tag in reversed(tags(root)):
        if is_committed(root / tag):
            if named and named != tag:
                log.warning("checkpoint: `latest` names %s but the newest intact checkpoint is %s", named, tag)
            return root / tag
        log.warning("checkpoint: passing over %s: incomplete or corrupt (no valid %s)", tag, COMMIT_MARKER)
    return None


def resolve_checkpoint(path_or_auto: str | Path, run_dir: str | Path | None = None) -> Path | None:
    """The committed checkpoint a `--checkpoint`, `checkpoint.resume` or convert argument means.

    `auto`: the newest intact one under `run_dir/checkpoints` (None when there is none yet); `none`: None.
    A path may be a tag directory, the `latest` file, a run's `checkpoints/` folder or a run directory (each of
    the last two: its newest intact checkpoint). Anything else raises FileNotFoundError saying what it found.
    """
    text = str(path_or_auto)
    if text == "none":
        return None
    if text == "auto":
        if run_dir is None:
            raise ValueError("checkpoint `auto` needs the run directory")
        return find_resume(Path(run_dir) / "checkpoints")
    path = Path(text)
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not (path / COMMIT_MARKER).exists() and not path.name.startswith("step_"):
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = find_resume(root)
        if found is None:
            raise FileNotFoundError(f"{text}: no committed checkpoint in it (looked for {root}/step_*/"
                                    f"{COMMIT_MARKER}); give a run directory, its checkpoints/ folder, `latest` "
                                    "or a tag directory")
        path = found
    if not path.exists():
        raise FileNotFoundError(f"{text}: no such checkpoint")
    if not is_committed(path):
        raise FileNotFoundError(f"{text}: not a committed, intact checkpoint (needs {COMMIT_MARKER} and every "
                                "file it lists)")
    return path


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`checkpoint.resume` against a run's `checkpoints/` folder `root`: resolve_checkpoint(resume, root.parent)."""
    return resolve_checkpoint(resume, Path(root).parent)


def prune(root: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete committed checkpoints beyond the newest `keep_last` (keeping every `keep_every`-th step) and
    incomplete ones older than the newest committed. Returns what was removed."""
    all_tags = tags(root)
    committed = [t for t in all_tags if is_committed(root / t)]
    keep = set(committed[-keep_last:])
    if keep_every:
        keep |= {t for t in committed if step_of(t) % keep_every == 0}
    newest = step_of(committed[-1]) if committed else -1
    removed = []
    for t in all_tags:
        stale_partial = t not in committed and step_of(t) < newest
        if (t in committed and t not in keep) or stale_partial:
            shutil.rmtree(root / t, ignore_errors=True)
            removed.append(t)
    return removed


class CheckpointWriteError(RuntimeError):
    """A save that failed half-way (a full disk above all); earlier checkpoints and `latest` are untouched."""


# How torch.save's C++ writer reports a failed write (ENOSPC included) without an errno.
_WRITER_ERRORS = ("inline_container", "iostream error", "PytorchStreamWriter", "file write failed")


def _disk_full(err: BaseException, free: int) -> bool:
    """ENOSPC in the exception chain, or a failed file write while the disk is (nearly) full."""
    chain: BaseException | None = err
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno == errno.ENOSPC or "No space left" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    a_write = isinstance(err, OSError) or any(s in str(err) for s in _WRITER_ERRORS)
    return a_write and free < 64 * 2**20


def write_failure(root: Path, tag: str, err: BaseException) -> CheckpointWriteError:
    """The error to raise when saving `tag` failed: says why (a full disk by name) and what still stands. The
    partial checkpoint is removed to give its space back (it was never committed, so nothing refers to it)."""
    ckpt_dir = root / tag
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    latest_file = root / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    if ckpt_dir.is_dir() and not is_committed(ckpt_dir):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    what = "no space left on device" if _disk_full(err, free) else "write failed"
    standing = f"`latest` still names {latest}" if latest else "no earlier checkpoint exists"
    return CheckpointWriteError(
        f"{what} while saving checkpoint {ckpt_dir} ({free / 2**20:.1f} MiB free in {root}): "
        f"{type(err).__name__}: {err}. The partial checkpoint was removed; earlier checkpoints are intact and "
        f"{standing}. Free space (or lower checkpoint.keep_last), then resume with checkpoint.resume=auto.")
