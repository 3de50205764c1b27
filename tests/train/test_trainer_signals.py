"""Signals a cluster sends, on real 2-rank runs through `pretrain launch`: checkpoint, exit 75, resume exactly.

No timing races: each test waits for metrics.jsonl (or `latest`) to show the run inside its loop, with generous
deadlines, and max_steps is large enough that the run is still going when the signal arrives.
"""

from __future__ import annotations

import signal
import time

import pytest
from helpers.faults import fault_env
from helpers.runs import launch, losses, metrics, write_config
from helpers.trainer import (
    assert_resumed,
    finish,
    logged_step,
    output,
    signal_all,
    start_launch,
    training_processes,
    wait_for,
)

from pretrain.exit_codes import EXIT_PREEMPTED
from pretrain.train import checkpoint as ckpt
from pretrain.train.signals import REPEAT_WINDOW_S

pytestmark = pytest.mark.slow

LONG = {"train.max_steps": 200, "checkpoint.every_steps": 0}
BF16 = {"data.num_workers": 2, "train.precision": "bf16"}


def _config(folder, assets, shapes, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "c.yaml", assets, shapes, **{**LONG, **overrides})


def _preempted_step(run_dir) -> int:
    """The step the run committed and exited at, checked against `latest` and its metrics."""
    step = int((run_dir / "PREEMPTED").read_text())
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == ckpt.tag_for(step)
    assert ckpt.is_committed(root / ckpt.tag_for(step)) and not (run_dir / "DONE").exists()
    assert metrics(run_dir)[-1]["step"] == step
    return step


def test_sigusr1_to_every_process_checkpoints_exits_75_and_resumes_exactly(tmp_path, assets, shapes):
    """As Slurm does (`scancel --signal=USR1`, `--signal`): the signal reaches every rank and every DataLoader worker
    (data.num_workers=2). The step in flight finishes, a checkpoint is committed, `pretrain launch` exits 75; the
    resumed run's losses equal an uninterrupted run's, bit for bit, in bf16 (the default precision: DeepSpeed's
    fp32 master weights and the bf16 model both come back from the checkpoint)."""
    cfg = _config(tmp_path / "a", assets, shapes, **BF16)
    run = cfg.parent / "run"
    proc = start_launch(cfg)
    wait_for(lambda: logged_step(run) >= 2, 300, "step 2 in metrics.jsonl", proc, cfg)
    procs = training_processes(proc.pid)
    assert len(procs["ranks"]) == 2 and len(procs["workers"]) >= 4, procs
    signal_all(procs["ranks"] + procs["workers"], signal.SIGUSR1)
    assert finish(proc, cfg, 300) == EXIT_PREEMPTED, output(cfg)[-5000:]
    k = _preempted_step(run)
    assert k >= 2 and "finishing this step" in output(cfg)

    before = metrics(run)
    again = launch(cfg, overrides=[f"train.stop_at_step={k + 2}"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert_resumed(again.stdout + again.stderr, run, k, before)
    ref_cfg = _config(tmp_path / "b", assets, shapes, **BF16)
    ref = launch(ref_cfg, overrides=[f"train.stop_at_step={k + 2}"])
    assert ref.returncode == 0, ref.stdout + ref.stderr
    got, want = losses(run), losses(ref_cfg.parent / "run")
    assert sorted(got) == list(range(1, k + 3))
    assert [got[s] for s in range(1, k + 3)] == [want[s] for s in range(1, k + 3)]


def test_sigterm_to_torchrun_during_a_save_ends_on_that_checkpoint(tmp_path, assets, shapes):
    """SIGTERM to torchrun itself (a user's `kill`, a scheduler that signals the launcher) while the periodic save of
    step 2 is under way (rank 0's commit made slow by fault injection): torchrun passes it to its workers and waits;
    they finish that save and exit on it, with no further step and no second save, and `pretrain launch` still
    reports 75."""
    cfg = _config(tmp_path, assets, shapes, **{"checkpoint.every_steps": 2})
    run = cfg.parent / "run"
    proc = start_launch(cfg, env=fault_env({"commit_sleep": 4.0}))
    saving = run / "checkpoints" / ckpt.tag_for(2)
    wait_for(lambda: saving.is_dir() and not (saving / ckpt.COMMIT_MARKER).exists(), 300, "the save of step 2",
             proc, cfg)
    (torchrun,) = training_processes(proc.pid)["torchrun"]
    torchrun.send_signal(signal.SIGTERM)
    assert finish(proc, cfg, 300) == EXIT_PREEMPTED, output(cfg)[-5000:]
    assert _preempted_step(run) == 2 and ckpt.tags(run / "checkpoints") == [ckpt.tag_for(2)]


def test_a_second_signal_exits_at_once_without_a_new_checkpoint(tmp_path, assets, shapes):
    """Steps from step 2 on made slow (12 s, fault injection) so both signals land inside one step: the first asks
    for a checkpoint, the second (after the repeat window) ends the run before that step ends. `latest` still names
    the checkpoint of step 1, no later one exists, and the exit code says "resume me"."""
    cfg = _config(tmp_path, assets, shapes, **{"checkpoint.every_steps": 1})
    run = cfg.parent / "run"
    proc = start_launch(cfg, env=fault_env({"step_sleep": 12.0, "step_sleep_from": 2}))
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: latest.is_file() and latest.read_text().strip() == ckpt.tag_for(1), 300,
             "the checkpoint of step 1", proc, cfg)
    ranks = training_processes(proc.pid)["ranks"]
    signal_all(ranks, signal.SIGUSR1)
    time.sleep(REPEAT_WINDOW_S + 0.5)
    assert proc.poll() is None, output(cfg)[-3000:]
    signal_all(ranks, signal.SIGUSR1)
    assert finish(proc, cfg, 120) == EXIT_PREEMPTED, output(cfg)[-5000:]
    text = output(cfg)
    assert "second signal" in text
    root = run / "checkpoints"
    assert latest.read_text().strip() == ckpt.tag_for(1) and ckpt.tags(root) == [ckpt.tag_for(1)]
    assert ckpt.is_committed(root / ckpt.tag_for(1)) and logged_step(run) == 1
