"""Helpers of the trainer tests: the shared uninterrupted reference runs, runs started in the background, the process
tree they make, a small tmpfs, and a probe that opens a Trainer in a lone process and reports what it resumed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from helpers.runs import ROOT, launch, metrics, write_config
from pretrain.train import checkpoint as ckpt

REFERENCE_STEPS, REFERENCE_EVERY = 6, 3


def reference_runs(tmp_path_factory, assets: dict, shapes: dict) -> Callable[[int], Path]:
    """`run(stage)`: the run directory of an uninterrupted 2-rank, 6-step run of the test recipe at that ZeRO stage,
    checkpointed every 3 steps; each stage is trained once and shared by every test that asks for it."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            root = tmp_path_factory.mktemp(f"ref{stage}")
            cfg = write_config(root / "c.yaml", assets, shapes, **{
                "train.max_steps": REFERENCE_STEPS, "checkpoint.every_steps": REFERENCE_EVERY,
                "deepspeed.zero_stage": stage})
            out = launch(cfg)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            runs[stage] = root / "run"
        return runs[stage]

    return run


def cut_back_to(reference: Path, run: Path, step: int) -> None:
    """A copy of a finished run as it was when the checkpoint of `step` was the newest (then the run died)."""
    shutil.copytree(reference, run)
    root = run / "checkpoints"
    for tag in ckpt.tags(root):
        if ckpt.step_of(tag) > step:
            shutil.rmtree(root / tag)
    (root / "latest").write_text(ckpt.tag_for(step))
    (run / "DONE").unlink()
    rows = [r for r in metrics(run) if r["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def start_launch(config: Path, nproc: int = 2, overrides: list[str] = (), env: dict | None = None) -> subprocess.Popen:
    """`pretrain launch` in the background, its output in a file beside the config (read with `output`)."""
    log = open(config.parent / "launch.log", "w")
    cmd = [sys.executable, "-m", "pretrain", "launch", str(config), "--nproc", str(nproc), *overrides]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def output(config: Path) -> str:
    return (config.parent / "launch.log").read_text()


def finish(proc: subprocess.Popen, config: Path, timeout: float) -> int:
    """The exit code; on a time-out the whole tree is killed and the test fails with the output."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail(f"run did not end within {timeout}s:\n{output(config)[-5000:]}")


def kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
             config: Path | None = None) -> None:
    """Poll until `predicate()` holds; fail (with the run's output) at the deadline or if the run ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{output(config)[-5000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                kill_tree(proc.pid)
            pytest.fail(f"no {what} within {timeout}s" + (f":\n{output(config)[-5000:]}" if config else ""))
        time.sleep(0.2)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def training_processes(launch_pid: int) -> dict[str, list[psutil.Process]]:
    """The tree under `pretrain launch`: torchrun, its ranks, and the ranks' DataLoader workers."""
    launcher = psutil.Process(launch_pid)
    torchrun = [p for p in launcher.children() if "torch.distributed.run" in " ".join(p.cmdline())]
    ranks = [c for t in torchrun for c in t.children()]
    workers = [w for r in ranks for w in r.children(recursive=True)]
    return {"torchrun": torchrun, "ranks": ranks, "workers": workers}


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def assert_resumed(text: str, run_dir, step: int, before: list[dict]) -> None:
    """The second launch resumed at `step` (its log says so) and did not redo the steps before it: their
    metrics.jsonl rows, timings included, are still the ones the first launch wrote."""
    assert f"resumed from {run_dir / 'checkpoints' / ckpt.tag_for(step)} at step {step}" in text, text[-3000:]
    rows = metrics(run_dir)
    assert [r for r in rows if r["step"] <= step] == [r for r in before if r["step"] <= step]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def may_mount() -> bool:
    """Root with CAP_SYS_ADMIN (bit 21 of the effective capabilities): mounting a tmpfs is permitted here."""
    status = Path("/proc/self/status").read_text().splitlines()
    caps = next((line.split()[1] for line in status if line.startswith("CapEff:")), "0")
    return os.geteuid() == 0 and bool(int(caps, 16) >> 21 & 1)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[tuple[bool, str]]:
    """A tmpfs of `size` at `path` (real ENOSPC). Yields (mounted, mount's own error output when it refused)."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    mounted = out.returncode == 0
    try:
        yield mounted, (out.stdout + out.stderr).strip()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


PROBE = r"""
import json, os, sys, torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from pretrain.config import load_config
from pretrain import distributed
from pretrain.train.trainer import Trainer

t = Trainer(load_config(sys.argv[1], sys.argv[2:]))
zero = t.resume_from / "universal" / "zero"
diff, norm, n = 0.0, 0.0, 0
loaded = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
for name, p in t.engine.module.named_parameters():
    if not p.requires_grad:
        continue
    loaded["fp32"][name] = safe_get_full_fp32_param(p).cpu().clone()
    for key in ("exp_avg", "exp_avg_sq"):
        got = safe_get_full_optimizer_state(p, key).cpu()
        loaded[key][name] = got.clone()
        want = torch.load(zero / name / f"{key}.pt", weights_only=False)
        want = (want["param"] if isinstance(want, dict) else want).view_as(got)  # ZeRO-1/2 files wrap the tensor
        diff = max(diff, (got - want).abs().max().item())
        norm += want.double().square().sum().item()
        n += 1
torch.save(loaded, os.environ["PROBE_DUMP"])
print("PROBE " + json.dumps({"step": t.step, "universal": t.universal, "max_diff": diff, "norm": norm,
                             "tensors": n}), flush=True)
distributed.finish(t.fit())
"""


def probe_resume(config: Path, overrides: list[str] = (), timeout: float = 300) -> tuple[dict, str, dict]:
    """A lone `Trainer` process (world size 1): resume, compare its optimizer state with the universal files, then
    train on. Returns the probe's report, the output, and the full fp32 weights and Adam moments it had loaded
    ({"fp32" | "exp_avg" | "exp_avg_sq": {name: tensor}})."""
    dump = config.parent / "probe_loaded.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PROBE_DUMP": str(dump)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(config), *overrides], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):]), text, torch.load(dump, weights_only=False)
