"""Local multi-process launch: torchrun with one process per GPU (or N CPU ranks), running `pretrain train`.

The config is loaded and validated here first, so a bad key fails once, before N processes start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_config
from pretrain.train.dist import EXIT_PREEMPTED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(config: str, nproc: int, overrides: list[str], master_port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(master_port),
            "-m", "pretrain", "train", config, *overrides]


def launch_local(config: str, nproc: int, overrides: list[str], master_port: int | None = None) -> int:
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    if nproc < 1:
        print("error: --nproc must be at least 1")
        return 2
    env = dict(os.environ)
    # Without this, each CPU rank spawns a thread per core and 2 ranks on 2 cores thrash.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = torchrun_command(config, nproc, overrides, master_port or _free_port())
    marker = Path(cfg.run.output_dir) / "PREEMPTED"
    marker.unlink(missing_ok=True)
    code = subprocess.call(cmd, env=env)
    # torchrun reports any non-zero worker exit as 1; the trainer leaves PREEMPTED when it exited for a signal
    # after a committed checkpoint, so the "resume me" code survives the launcher.
    return EXIT_PREEMPTED if code != 0 and marker.exists() else code
