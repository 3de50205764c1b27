"""The entry points: `pretrain train` runs alone (world size 1, no launcher; checkpoint retention on that run), config
errors stop it before anything starts, and the `pretrain demo` pipeline runs end to end (shards -> ZeRO-3 on 2 ranks
-> export -> captions). `pretrain train` under plain torchrun is the first part of the ZeRO-3 exact-resume test
(train/test_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.runs import ROOT, losses, write_config

from pretrain.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_train_alone_at_world_size_one_keeps_last_k_and_every_mth_checkpoint(tmp_path, assets, shapes):
    """`pretrain train` with no launcher; the same run checks retention: a checkpoint every step, the last 2 and
    every 3rd kept."""
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"checkpoint.every_steps": 1, "checkpoint.keep_last": 2,
                                                               "checkpoint.keep_every": 3})
    out = _run([sys.executable, "-m", "pretrain", "train", str(cfg)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert ckpt.tags(root) == ["step_00000003", "step_00000005", "step_00000006"]


def test_train_reports_config_errors_without_starting(tmp_path, assets, shapes):
    cfg = write_config(tmp_path / "c.yaml", assets, shapes)
    out = _run([sys.executable, "-m", "pretrain", "train", str(cfg), "train.max_stpes=3"])
    assert out.returncode == 2 and "train.max_stpes: unknown key" in out.stderr
    out = _run([sys.executable, "-m", "pretrain", "launch", str(cfg), "--nproc", "2", "deepspeed.zero_stage=5"])
    assert out.returncode == 2 and "deepspeed.zero_stage: Input should be 0, 1, 2 or 3" in out.stderr


def test_demo_pipeline_end_to_end(tmp_path):
    out = _run([sys.executable, "-m", "pretrain", "demo", str(tmp_path / "demo"), "--train-samples", "256",
                "train.max_steps=8", "train.warmup_steps=2", "train.log_every=1", "train.val_every=4",
                "checkpoint.every_steps=4"],
               timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "attribute accuracy on 8 validation images" in out.stdout
    assert "| one" in out.stdout or "| two" in out.stdout or "| three" in out.stdout  # truth column printed
    hf = tmp_path / "demo" / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    assert not list(hf.glob("*.bin")) and not list(hf.glob("*.pt"))
    run_losses = losses(tmp_path / "demo" / "run")
    assert run_losses[8] < run_losses[1]
