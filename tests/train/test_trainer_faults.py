"""Faults a cluster inflicts, injected for real on one 2-rank run under `pretrain launch --max-restarts 2`: a rank
stopped (SIGSTOP) after the first checkpoint hangs the run until the watchdog ends it, naming that rank; a rank
killed (SIGKILL) in the restarted run; both times the launcher restarts from the newest checkpoint, and the run ends
with the uninterrupted run's losses, every step and every sample of it trained once."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from helpers.faults import fault_env
from helpers.runs import losses, write_config
from helpers.trainer import finish, kill_tree, logged_step, output, start_launch, training_processes, wait_for

from pretrain.exit_codes import EXIT_STALLED
from pretrain.train import checkpoint as ckpt
from pretrain.train.watchdog import PHASES

pytestmark = pytest.mark.slow

HANG_TIMEOUT_S = 12.0
# The watchdog polls every HANG_TIMEOUT_S / 20 and a verdict takes one more poll; the rest: a loaded 2-core machine.
HANG_GIVE_UP_S = HANG_TIMEOUT_S + 15.0


def _rank(rank: int, proc):
    """The training process of `rank` (by its RANK variable) under the launcher `proc`."""
    for p in training_processes(proc.pid)["ranks"]:
        if p.environ().get("RANK") == str(rank):
            return p
    pytest.fail(f"no rank {rank} under the launcher")


def test_hung_then_killed_rank_restarts_and_trains_every_sample_once(tmp_path, assets, shapes, reference_run):
    reference = reference_run(3)  # 6 steps, a checkpoint every 3, ZeRO-3: the same run, uninterrupted
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{
        "train.max_steps": 6, "checkpoint.every_steps": 3, "deepspeed.zero_stage": 3, "data.record_samples": True,
        "train.hang_timeout_minutes": HANG_TIMEOUT_S / 60})
    run = cfg.parent / "run"
    # Slow steps after the checkpoint of step 3 (fault injection: a sleep, the numbers are unchanged), so that the
    # faults land mid-run.
    faults = {"step_sleep": 2.0, "step_sleep_from": 4}
    proc = start_launch(cfg, overrides=["--max-restarts", "2"], env=fault_env(faults))
    try:
        _hang_then_crash(cfg, proc)
    finally:
        kill_tree(proc.pid)  # nothing left running when an assertion failed
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, 7)) and [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]
    keys = []
    for rank in (0, 1):
        rows = [json.loads(line) for line in (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7))
        keys += [(k["shard"], k["key"], k["epoch"]) for r in rows for k in r["keys"]]
    assert len(keys) == 6 * 4 * 2 and len(set(keys)) == len(keys)  # 6 steps x 4 samples x 2 ranks, none twice
    assert (run / "DONE").is_file() and not (run / "OWNER").exists()


def _hang_then_crash(cfg, proc) -> None:
    run = cfg.parent / "run"
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: latest.is_file() and latest.read_text().strip() == ckpt.tag_for(3), 300,
             "the checkpoint of step 3", proc, cfg)

    # 1. A hang: rank 1 stopped. Rank 0 waits in a collective; its watchdog ends the run, naming rank 1.
    stopped = _rank(1, proc)
    stopped.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    wait_for(lambda: "the hang watchdog ended the run" in output(cfg), 120, "the watchdog's verdict", proc, cfg)
    gave_up = time.monotonic() - t0
    text = output(cfg)
    # Rank 1's last progress may predate the stop by one step sleep and one poll.
    assert HANG_TIMEOUT_S - 3.0 <= gave_up < HANG_GIVE_UP_S, (gave_up, text[-3000:])
    verdict = re.search(r"hang watchdog ended the run: stalled \(timeout 12 s\): (rank \d) on \S+ \(pid (\d+)\): "
                        r"last phase (\w+) at step (\d+)", text)
    assert verdict, text[-5000:]
    # The phase and step rank 1 last published (every poll, 0.6 s here: a fast step or two may lie between).
    assert verdict.group(1) == "rank 1" and int(verdict.group(2)) == stopped.pid and int(verdict.group(4)) >= 1
    assert verdict.group(3) in PHASES
    assert "no heartbeat" in text and "Thread 0x" in text  # the stacks of the live rank (faulthandler)
    assert f"(exit {EXIT_STALLED})" in text and "restart 1 of at most 2, resuming from step 3" in text

    # 2. A crash in the restarted run: rank 1 killed after it logged a step past the checkpoint.
    wait_for(lambda: text.count("resumed from") < output(cfg).count("resumed from") and logged_step(run) >= 4, 300,
             "the restarted run at step 4", proc, cfg)
    victim = _rank(1, proc)
    assert victim.pid != stopped.pid
    victim.kill()
    t1 = time.monotonic()
    wait_for(lambda: "restart 2 of at most 2" in output(cfg), 120, "the second restart", proc, cfg)
    restarted_in = time.monotonic() - t1
    assert restarted_in < 30, restarted_in
    after = output(cfg)[len(text):]
    assert "rank 1 exited first" in after, after[-3000:]
    assert "no new checkpoint since the last start: one more try" in after

    assert finish(proc, cfg, 300) == 0, output(cfg)[-5000:]
