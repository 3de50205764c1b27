"""A run directory has one owner: RUN_DIR/OWNER names the job that trains in it (job id, host, pid, start time).

Rank 0 claims the directory before anything is written: the file is created exclusively (O_EXCL); when it exists,
its job is asked whether it lives. The same job (a Slurm requeue keeps its job id; `pretrain launch`'s in-job
restarts share one) takes over. Another job's owner lives when its process runs (same host: the pid with that start
time) or its heartbeat is fresh (another host: the owner's watchdog touches the file every few seconds; a stale one
means the job is gone); then this job is refused with a message naming the owner. A dead owner's directory is taken
over, with a warning. A normal exit removes the file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from pretrain.atomic_file import write_atomic
from pretrain.config import ConfigError

log = logging.getLogger(__name__)

OWNER = "OWNER"
STALE_S = 180.0  # an owner on another host whose heartbeat is older than this is gone (clocks may differ a little)


class RunDirOwned(ConfigError):
    """Another job, alive, owns the run directory: like a config error, never worth a restart (exit 2)."""


def job_id() -> str:
    """This job: Slurm's job id (kept across requeues), `pretrain launch`'s (kept across its restarts), else
    this process."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("PRETRAIN_JOB_ID") or f"pid-{os.getpid()}"


def _me() -> dict:
    import psutil  # DeepSpeed's dependency

    return {"job": job_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time(), "claimed": time.time()}


def _alive(owner: dict, mtime: float) -> bool:
    if owner.get("host") != socket.gethostname():
        return time.time() - mtime < STALE_S
    import psutil

    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["started"]) < 1.0
    except (psutil.Error, KeyError, TypeError):
        return False


def describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("claimed", 0)))
    return f"job {owner.get('job')} on {owner.get('host')} (pid {owner.get('pid')}, since {since})"


def claim(run_dir: Path) -> None:
    """Make this job the owner of `run_dir` (rank 0, at start), or raise RunDirOwned naming the live owner."""
    path = Path(run_dir) / OWNER
    me = _me()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        _take_over(path, me)
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")


def _take_over(path: Path, me: dict) -> None:
    try:
        owner, mtime = json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        owner, mtime = {}, 0.0  # torn or vanished: nobody holds it
    if owner and owner.get("job") != me["job"] and _alive(owner, mtime):
        raise RunDirOwned(f"run directory {path.parent} is in use by {describe(owner)}: two jobs in one run "
                          "directory would overwrite each other's checkpoints. Wait for it to end, stop it, or give "
                          f"this run another run.output_dir (the owner is recorded in {path})")
    if owner and owner.get("job") != me["job"]:
        log.warning("run directory %s: its owner %s is gone; this job (%s) takes it over", path.parent,
                    describe(owner), me["job"])
    write_atomic(path, json.dumps(me) + "\n")
    now = json.loads(path.read_text())
    if now.get("pid") != me["pid"]:  # another job took it over in the same moment
        raise RunDirOwned(f"run directory {path.parent} was just taken over by {describe(now)}")


def heartbeat(run_dir: Path) -> None:
    """The owner is alive (its watchdog calls this every few seconds)."""
    try:
        os.utime(Path(run_dir) / OWNER)
    except OSError:
        pass


def release(run_dir: Path) -> None:
    """A normal exit: the directory is free for the next job."""
    path = Path(run_dir) / OWNER
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
