"""One run directory seen alike by every rank, on a shared file system whose caches may lag (NFS, Lustre, GPFS).

Rules: rank 0 decides what a rank's own view could get wrong, and the others take its word. At start-up the ranks
check that they see one `run.output_dir` (rank 0 writes a random token, every rank reads it back), so a node-local
directory on a multi-node job stops the run at once with a message naming the cause. Rank 0 resolves the checkpoint
to resume and broadcasts the choice. At a save, every rank reports the files it wrote and their sizes (its own
view right after its own writes) and COMMITTED lists those; rank 0's listing only adds the files it wrote itself.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from pretrain import distributed
from pretrain.atomic_file import write_atomic
from pretrain.train import checkpoint as ckpt

TOKEN = ".run_token"
# How long a rank keeps looking for rank 0's token: a shared file system may show a new file a little late.
TOKEN_GRACE_S = 5.0


class SharedRunDirError(RuntimeError):
    """The ranks do not see one run directory."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _wait_for_token(path: Path, token: str, grace_s: float) -> str | None:
    """What this rank finds at `path` once it shows `token` or the grace period is over."""
    deadline = time.monotonic() + grace_s
    seen = _read(path)
    while seen != token and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = _read(path)
    return seen


def check_one_run_dir(run_dir: Path, rank: int, grace_s: float = TOKEN_GRACE_S) -> None:
    """Collective: raise SharedRunDirError on every rank unless every rank reads the token rank 0 just wrote."""
    path = Path(run_dir) / TOKEN
    token = None
    if rank == 0:
        token = f"{uuid.uuid4().hex} written by rank 0 on {socket.gethostname()}"
        write_atomic(path, token + "\n")
    token = distributed.broadcast_object(token)
    seen = token if rank == 0 else _wait_for_token(path, token, grace_s)
    views = distributed.all_gather_object({"host": socket.gethostname(), "path": str(path.absolute()), "seen": seen})
    bad = [(r, v) for r, v in enumerate(views) if v["seen"] != token]
    if not bad:
        return
    what = "; ".join(f"rank {r} on {v['host']} found {'nothing' if v['seen'] is None else 'another token'} at "
                     f"{v['path']}" for r, v in bad)
    raise SharedRunDirError(
        f"run.output_dir is not one directory shared by all ranks: rank 0 on {views[0]['host']} wrote a start-up "
        f"token to {views[0]['path']}, but {what}. On several nodes run.output_dir must be on a file system every "
        "node mounts at the same path (NFS, Lustre, GPFS, ...), not a node-local disk such as /tmp")


def agree_on_resume(resume: str, root: Path, rank: int, verify: str = "sizes") -> tuple[Path | None, dict[str, Any]]:
    """Collective: rank 0 resolves checkpoint.resume (auto / none / a path) and every rank takes its choice, so
    two nodes whose directory caches differ cannot load different checkpoints. Returns (checkpoint, its COMMITTED
    meta); a bad explicit path raises FileNotFoundError on every rank."""
    choice: dict[str, Any] = {}
    if rank == 0:
        try:
            path = ckpt.resolve_resume(resume, Path(root), verify)  # checkpoint.verify: sizes or CRC-32s
            choice = {"path": str(path) if path else None, "meta": ckpt.read_meta(path) if path else {}}
        except (FileNotFoundError, OSError) as err:
            choice = {"error": str(err)}
    choice = distributed.broadcast_object(choice)
    if "error" in choice:
        raise FileNotFoundError(choice["error"])
    return (Path(choice["path"]) if choice["path"] else None), choice["meta"]


class WrittenFiles:
    """The checkpoint files this process writes: DeepSpeed's (recorded at its checkpoint engine's `save`, the one
    call every shard goes through) and the trainer's own (`add`)."""

    def __init__(self, engine: Any) -> None:
        self.paths: list[Path] = []
        inner = engine.checkpoint_engine.save

        def save(state_dict: Any, path: str) -> None:
            inner(state_dict, path)
            self.paths.append(Path(path))

        engine.checkpoint_engine.save = save

    def add(self, path: Path) -> None:
        self.paths.append(Path(path))

    def report(self, ckpt_dir: Path) -> dict[str, int]:
        """{name inside ckpt_dir: size} of what this process wrote there since the last report, each file synced
        first (the size is the writer's own, never a cached one); the record starts afresh."""
        out, root = {}, Path(ckpt_dir).resolve()
        for p in (p.resolve() for p in self.paths):
            if p.is_file() and p.is_relative_to(root):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                out[str(p.relative_to(root))] = p.stat().st_size
        self.paths = []
        return out
