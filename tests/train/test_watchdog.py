"""The hang watchdog's judgement (which rank is to blame, after how long) on records as ranks publish them, and a
real process whose loader blocks on a stalled file (a FIFO nobody writes) with no collective pending: the watchdog
ends it, naming its phase, with its stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from helpers.runs import ROOT

from pretrain.exit_codes import EXIT_STALLED
from pretrain.train.watchdog import FLOOR_S, STARTUP_S, Progress, Watchdog, read_verdict, timeout_for


def _rec(rank: int, beat: int, seq: int, step: int, phase: str, step_s: float = 1.0, save_s: float = 0.0) -> dict:
    return {"rank": rank, "host": "n1" if rank < 2 else "n2", "pid": 100 + rank, "beat": beat, "seq": seq,
            "step": step, "phase": phase, "step_s": step_s, "save_s": save_s}


def _judge(frames: list[tuple[float, list[dict]]], fixed_s: float | None = 60.0) -> dict | None:
    """Feed the records seen at each time to one watchdog's judgement; the last verdict."""
    dog = Watchdog.__new__(Watchdog)
    dog.fixed_s, dog.poll_s, dog._seen = fixed_s, 1.0, {}
    verdict = None
    for now, records in frames:
        verdict = dog.check(records, now)
    return verdict


def test_a_stopped_rank_is_blamed_after_the_timeout_and_not_before():
    moving = [_rec(0, 1, 10, 4, "forward"), _rec(1, 1, 9, 4, "data")]
    # Rank 0 keeps beating (its watchdog thread lives) but waits in a collective; rank 1 publishes nothing more.
    stuck = [_rec(0, 2, 11, 4, "backward"), _rec(1, 1, 9, 4, "data")]
    assert _judge([(0.0, moving), (30.0, stuck), (59.5, stuck)]) is None  # 59.5 s since rank 1 moved
    verdict = _judge([(0.0, moving), (30.0, stuck), (61.0, [_rec(0, 3, 11, 4, "backward"), stuck[1]])])
    assert [s["rank"] for s in verdict["blamed"]] == [1] and [s["rank"] for s in verdict["stalled"]] == [1]
    verdict = _judge([(0.0, moving), (30.0, stuck), (91.0, [_rec(0, 4, 11, 4, "backward"), stuck[1]])])
    assert [s["rank"] for s in verdict["blamed"]] == [1] and {s["rank"] for s in verdict["stalled"]} == {0, 1}
    # Stopped 20 s after its last progress (inside a long step): silent for 41 s of the 61 s without progress.
    late = _judge([(0.0, moving), (20.0, [_rec(0, 2, 11, 4, "backward"), _rec(1, 2, 9, 4, "data")]),
                   (61.0, [_rec(0, 5, 11, 4, "backward"), _rec(1, 2, 9, 4, "data")])])
    assert [s["rank"] for s in late["blamed"]] == [1] and late["blamed"][0]["frozen"]
    text = Watchdog.describe(verdict)
    assert text.startswith("stalled (timeout 60 s): rank 1 on n1 (pid 101): last phase data at step 4, no progress "
                           "for 91 s (no heartbeat for 91 s either: the process is stopped or gone)"), text
    assert "waiting for it: rank 0 (backward at step 4)" in text


def test_every_rank_stuck_alive_at_the_same_place_blames_all_and_the_one_behind_is_blamed_alone():
    first = [_rec(0, 1, 5, 3, "data"), _rec(1, 1, 5, 3, "data"), _rec(2, 1, 7, 3, "forward")]
    later = [_rec(0, 9, 5, 3, "data"), _rec(1, 9, 5, 3, "data"), _rec(2, 9, 7, 3, "forward")]
    verdict = _judge([(0.0, first), (61.0, later)])
    assert [s["rank"] for s in verdict["blamed"]] == [0, 1]  # rank 2 waits for them in its forward's collective
    assert "alive, its main thread is stuck" in Watchdog.describe(verdict)
    everyone = [_rec(r, 1, 5, 3, "data") for r in range(3)]
    verdict = _judge([(0.0, everyone), (61.0, [_rec(r, 9, 5, 3, "data") for r in range(3)])])
    assert [s["rank"] for s in verdict["blamed"]] == [0, 1, 2]  # all loaders on one stalled file system
    commit = [_rec(r, 1, 5, 6, "commit") for r in range(3)]
    verdict = _judge([(0.0, commit), (61.0, [_rec(r, 9, 5, 6, "commit") for r in range(3)])])
    assert [s["rank"] for s in verdict["blamed"]] == [0]  # the others wait for rank 0's commit
    done = [_rec(0, 1, 5, 6, "done"), _rec(1, 1, 5, 6, "done")]
    assert _judge([(0.0, done), (1000.0, done)]) is None


def test_the_derived_timeout_follows_the_measured_steps_and_saves():
    fresh = [_rec(0, 1, 1, 1, "data", step_s=0.0), _rec(1, 1, 1, 1, "data", step_s=0.0)]
    assert timeout_for("forward", fresh, None) == STARTUP_S and timeout_for("save", fresh, None) == STARTUP_S
    quick = [_rec(0, 1, 1, 9, "data", step_s=0.5, save_s=20.0), _rec(1, 1, 1, 9, "data", step_s=2.0)]
    assert timeout_for("forward", quick, None) == FLOOR_S and timeout_for("commit", quick, None) == FLOOR_S
    slow = [_rec(0, 1, 1, 9, "data", step_s=45.0, save_s=400.0), _rec(1, 1, 1, 9, "data", step_s=90.0)]
    assert timeout_for("data", slow, None) == 900.0 and timeout_for("save", slow, None) == 1200.0
    assert timeout_for("save", slow, 42.0) == 42.0  # train.hang_timeout_minutes wins
    progress = Progress()
    assert progress.commit_wait_s(7200.0) == 7200.0  # no save measured yet: the bound
    progress.save_done(30.0)
    assert progress.commit_wait_s(7200.0) == FLOOR_S
    progress.save_done(4000.0)
    assert progress.commit_wait_s(7200.0) == 7200.0


STALLED_LOADER = textwrap.dedent("""
    import os, sys, datetime
    import torch.distributed as tdist
    from pretrain.train.watchdog import Progress, Watchdog
    tdist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=600))
    progress = Progress()
    Watchdog(progress, 0, 1, sys.argv[2], timeout_minutes=2 / 60).start()
    progress.enter("data", 5)
    with open(sys.argv[1], "rb") as stalled:  # a file system that never answers: blocks, no collective pending
        stalled.read(1)
""")


@pytest.mark.slow
def test_a_loader_blocked_on_a_stalled_file_ends_the_process(tmp_path):
    fifo = tmp_path / "shard.tar"
    os.mkfifo(fifo)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", STALLED_LOADER, str(fifo), str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    took = time.monotonic() - start
    assert out.returncode == EXIT_STALLED, out.stderr[-3000:]
    assert "rank 0 on" in out.stderr and "last phase data at step 5" in out.stderr, out.stderr[-3000:]
    assert "alive, its main thread is stuck" in out.stderr
    assert "in <module>" in out.stderr and "Thread 0x" in out.stderr  # the main thread's stack, at the read
    verdict = read_verdict(tmp_path)
    assert verdict["blamed"][0]["phase"] == "data" and json.dumps(verdict)
    assert took < 60, took  # 2 s of no progress, then one poll; the rest is starting Python and torch


def _port() -> int:
    from pretrain.ports import free_port

    return free_port()
