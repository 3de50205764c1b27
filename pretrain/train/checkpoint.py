"""Sharded checkpoints that count only once complete.

Layout: `checkpoints/<tag>/` holds DeepSpeed's files (saved with save_latest=False), one `trainer_rank<r>.pt` per
rank (its parts of the run's state: pretrain.train.resume), and `COMMITTED`, written by rank 0 last, after every
rank has written and reported its files: it lists every file with its size as the rank that wrote it reported it.
`checkpoints/latest` (the tag as text, DeepSpeed's own format, so its tools read it too) is replaced atomically only
after that. A save killed half-way leaves a tag without COMMITTED; `latest` still names the previous one, and
`resume: auto` passes over the incomplete one with a warning.

`checkpoint.verify`: `sizes` checks that every listed file is there with its size; `crc` also stores a CRC-32 of
every listed file in COMMITTED (each rank sums what it wrote, right after writing it) and checks them at resume, so
a flipped bit or a file overwritten in place passes the checkpoint over, with a warning naming the file, for the
previous committed one. Cost measured at a 1B-parameter checkpoint: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# numpy and torch are imported inside the functions that seed, save or load tensors: the launcher and the requeue
# decision (launch/) read checkpoint directories without paying torch's import.
from pretrain.atomic_file import AtomicFile, fsync_dir, write_atomic

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
LATEST = "latest"
HF_META = "hf_meta"  # Llava config + tokenizer + image processor, for export


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])




def write_rank_state(ckpt_dir: Path, rank: int, state: dict[str, Any]) -> Path:
    path = ckpt_dir / f"trainer_rank{rank:05d}.pt"
    import torch

    with AtomicFile(path, durable=True) as f:
        torch.save(state, f)
    return path


def read_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any] | None:
    path = Path(ckpt_dir) / f"trainer_rank{rank:05d}.pt"
    if not path.is_file():
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


CRC_CHUNK = 16 << 20


def file_crc32(path: Path) -> str:
    """The CRC-32 of a file (zlib's, which releases the GIL: files are summed on threads), as 8 hex digits."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CRC_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def checksums(ckpt_dir: Path, names: list[str] | dict[str, Any]) -> dict[str, str]:
    """{name: CRC-32} of the files `names` inside `ckpt_dir`, summed on a few threads."""
    names = sorted(names)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(names), 1))) as pool:
        return dict(zip(names, pool.map(lambda n: file_crc32(Path(ckpt_dir) / n), names)))


def commit(root: Path, tag: str, meta: dict[str, Any], reports: list[dict[str, int]] | None = None,
           crcs: dict[str, str] | None = None) -> None:
    """Rank 0, once every rank has written: the marker, then `latest`.

    `reports[r]` is what rank r says it wrote ({name: size}, pretrain.train.shared_fs.WrittenFiles); the marker
    lists those, so a file another node wrote counts even where rank 0's directory cache does not show it yet.
    Rank 0's own listing adds the files it wrote outside the reports (the export metadata, DeepSpeed's scripts).
    `crcs` (checkpoint.verify=crc): the CRC-32s the ranks computed of what they wrote; rank 0 sums the rest of the
    listed files, and the marker keeps one for every file it lists."""
    ckpt_dir = root / tag
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != COMMIT_MARKER}
    written_by = {}
    for rank, report in enumerate(reports or []):
        files.update(report)
        written_by[str(rank)] = sorted(report)
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_dir():
            fsync_dir(p)
    marker = {**meta, "tag": tag, "time": time.time(), "files": dict(sorted(files.items()))}
    if written_by:
        marker["written_by"] = written_by
    if crcs is not None:
        crcs = {**crcs, **checksums(ckpt_dir, [n for n in files if n not in crcs])}
        marker["crc32"] = dict(sorted(crcs.items()))
    write_atomic(ckpt_dir / COMMIT_MARKER, json.dumps(marker, indent=1), durable=True)
    write_atomic(root / LATEST, tag, durable=True)


def problem(ckpt_dir: Path, verify: str = "sizes") -> str | None:
    """Why `ckpt_dir` is not a committed, intact checkpoint (None when it is): no marker, a listed file missing or
    of another size, and with verify="crc" a listed file whose CRC-32 differs from the marker's (a marker written
    without checksums is checked by sizes)."""
    marker = Path(ckpt_dir) / COMMIT_MARKER
    if not marker.is_file():
        return f"incomplete (no {COMMIT_MARKER})"
    try:
        listed = json.loads(marker.read_text())
        files = listed["files"]
    except (json.JSONDecodeError, KeyError, OSError) as err:
        return f"{COMMIT_MARKER} cannot be read ({type(err).__name__}: {err})"
    for name, size in files.items():
        path = Path(ckpt_dir) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {COMMIT_MARKER} lists {size}"
    if verify == "crc" and "crc32" in listed:
        try:
            found = checksums(ckpt_dir, list(listed["crc32"]))
        except OSError as err:
            return f"a listed file cannot be read ({type(err).__name__}: {err})"
        for name, want in listed["crc32"].items():
            if found[name] != want:
                return f"{name} fails its CRC-32 check ({found[name]}, {COMMIT_MARKER} lists {want})"
    return None


def is_committed(ckpt_dir: Path, verify: str = "sizes") -> bool:
    """Committed and intact: the marker exists and every listed file is there with its size (and CRC-32)."""
    return problem(ckpt_dir, verify) is None


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / COMMIT_MARKER).read_text())


def tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=step_of)


def find_resume(root: Path, verify: str = "sizes") -> Path | None:
    """The newest committed, intact checkpoint; warns about newer incomplete or corrupt ones it passes over, each
    with what is wrong (the file that fails), and names the one it takes instead."""
    latest_file = root / LATEST
    named = latest_file.read_text().strip() if latest_file.is_file() else None
    passed = []
    for tag in reversed(tags(root)):
        why = problem(root / tag, verify)
        if why is None:
            if named and named != tag:
                log.warning("checkpoint: `latest` names %s but the newest intact checkpoint is %s", named, tag)
            if passed:
                log.warning("checkpoint: using %s, the newest committed checkpoint before %s", tag, passed[0])
            return root / tag
        log.warning("checkpoint: passing over %s: %s", tag, why)
        passed.append(tag)
    return None


def resolve_checkpoint(path_or_auto: str | Path, run_dir: str | Path | None = None,
                       verify: str = "sizes") -> Path | None:
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
        return find_resume(Path(run_dir) / "checkpoints", verify)
    path = Path(text)
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not (path / COMMIT_MARKER).exists() and not path.name.startswith("step_"):
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = find_resume(root, verify)
        if found is None:
            raise FileNotFoundError(f"{text}: no committed checkpoint in it (looked for {root}/step_*/"
                                    f"{COMMIT_MARKER}); give a run directory, its checkpoints/ folder, `latest` "
                                    "or a tag directory")
        path = found
    if not path.exists():
        raise FileNotFoundError(f"{text}: no such checkpoint")
    why = problem(path, verify)
    if why is not None:
        raise FileNotFoundError(f"{text}: not a committed, intact checkpoint (needs {COMMIT_MARKER} and every "
                                f"file it lists): {why}")
    return path


def resolve_resume(resume: str, root: Path, verify: str = "sizes") -> Path | None:
    """`checkpoint.resume` against a run's `checkpoints/` folder `root`: resolve_checkpoint(resume, root.parent)."""
    return resolve_checkpoint(resume, Path(root).parent, verify)


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
