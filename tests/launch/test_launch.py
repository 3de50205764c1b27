"""`pretrain launch` behaviour the other suites do not cover: usage and world-size errors (2, before any process
starts) and a signal sent to the launcher itself reaching every rank (75, after a committed checkpoint). A finished
run (0) and failing runs are in train/test_train.py, an unknown key (2) in cli/test_entry_points.py, signals sent to
the ranks or to torchrun in train/test_trainer_signals.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import ROOT, write_config

from pretrain.cli import main
from pretrain.exit_codes import EXIT_CONFIG, EXIT_PREEMPTED
from pretrain.launch.local import FORWARDED, torchrun_command
from pretrain.train import checkpoint as ckpt


@pytest.mark.parametrize(("argv", "message"), [
    (["--nproc", "2", "train.global_batch_size=5"], "train.global_batch_size"),
    (["--nproc", "0"], "--nproc must be at least 1"),
])
def test_config_errors_exit_2_before_starting_anything(tmp_path, assets, shapes, capsys, argv, message):
    cfg = write_config(tmp_path / "c.yaml", assets, shapes)
    assert main(["launch", str(cfg), *argv]) == EXIT_CONFIG
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no process ever started


def test_missing_config_exits_2(tmp_path, capsys):
    assert main(["launch", str(tmp_path / "nope.yaml"), "--nproc", "1"]) == EXIT_CONFIG
    assert "config file not found" in capsys.readouterr().err


def test_torchrun_command_forwards_the_checkpoint_signals():
    cmd = torchrun_command("c.yaml", 4, ["train.lr=1e-4"], 29500, shutdown_timeout=77)
    handled = cmd[cmd.index("--signals-to-handle") + 1].split(",")
    assert {"SIGTERM", "SIGUSR1", "SIGINT"} <= set(handled) and len(handled) == len(FORWARDED)
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "77" and cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[-5:] == ["-m", "pretrain", "train", "c.yaml", "train.lr=1e-4"]


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


@pytest.mark.slow
def test_signalled_run_checkpoints_and_exits_75(tmp_path, assets, shapes):
    # SIGUSR1 to the launcher (what Slurm's --signal sends; SIGTERM is handled alike): it reaches every rank through
    # torchrun, the ranks finish their step, commit a checkpoint and leave PREEMPTED; the launcher exits 75.
    steps = 30  # long enough to be still training when the signal lands
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"train.max_steps": steps})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "launch", str(cfg), "--nproc", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _logged_steps(run) or _logged_steps(run)[-1] < 2:  # both ranks training, handlers in place
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no step 2 in 240 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, out
    stopped = int((run / "PREEMPTED").read_text())
    assert 2 <= stopped < steps and not (run / "DONE").exists(), out
    assert _logged_steps(run) == list(range(1, stopped + 1))
    assert ckpt.find_resume(run / "checkpoints") == run / "checkpoints" / ckpt.tag_for(stopped)
    assert f"signal {signal.SIGUSR1.value}: finishing this step" in out
    assert f"stopped on a signal at step {stopped}; the last committed checkpoint stands" in out
