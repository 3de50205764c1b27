"""The test recipe (the demo recipe on the tiny local models and shards), real multi-process training through
`pretrain launch`, and its metrics read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, assets: dict, shapes: dict, llm: str = "llama", vision: str = "clip",
                 **overrides) -> Path:
    """The demo recipe pointed at the test assets, with dotted overrides applied."""
    from pretrain.config import apply_override

    tree = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    tree["run"]["output_dir"] = str(path.parent / "run")
    tree["model"]["llm"], tree["model"]["vision"] = str(assets[llm]), str(assets[vision])
    tree["data"]["train"] = [{"urls": shapes["train"]["urls"]}]
    tree["data"]["val"] = [{"urls": shapes["val"]["urls"]}]
    tree["train"].update(max_steps=6, micro_batch_size=4, log_every=1, val_every=0, warmup_steps=0,
                         progress_bar=False)
    tree["checkpoint"].update(every_steps=0)
    # The demo's tuning (vision lr multiplier, contrastive objective) is not part of the plain test base: tests
    # that want it set it, and stage switches (align) stay valid.
    tree["train"].pop("lr_multipliers", None)
    tree.pop("objectives", None)
    tree["data"].update(num_workers=0, shuffle_buffer=16)
    for key, value in overrides.items():
        apply_override(tree, key.split("."), value)
    path.write_text(yaml.safe_dump(tree))
    return path


def launch(config: Path, nproc: int = 2, overrides: list[str] = (), timeout: int = 300,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`pretrain launch` as a user runs it; fails the test (with the output) on a time-out."""
    cmd = [sys.executable, "-m", "pretrain", "launch", str(config), "--nproc", str(nproc), *overrides]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"training did not finish in {timeout}s:\n{err.stdout}\n{err.stderr}")


def torchrun_train(config: Path, nproc: int = 2, overrides: list[str] = (),
                   timeout: int = 300) -> subprocess.CompletedProcess:
    """`pretrain train` under plain torchrun (no `pretrain launch`), as a user of torchrun's own CLI starts it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "pretrain", "train", str(config), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun training did not finish in {timeout}s:\n{err.stdout}\n{err.stderr}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}
