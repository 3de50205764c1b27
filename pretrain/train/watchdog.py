"""Hang detection of our own: a rank that makes no progress ends the run within minutes, naming itself.

Every rank's main thread marks its progress (`Progress.enter`: the step and the phase it starts: data, forward,
backward, optimizer, save, commit, validate): plain attribute writes, nothing else. A watchdog thread on every rank
publishes its rank's record (progress, a heartbeat of its own, host, pid, the step and save times it measured) to
the rendezvous store every few seconds and reads every rank's record back: never through a collective, so a rank
blocked in one, or a loader blocked on a stalled file system with no collective pending, is seen all the same.

A rank whose progress has not moved for the hang timeout is stalled. The timeout is `train.hang_timeout_minutes`
when set, else derived from what the ranks measured, the slowest rank's numbers: 10 x the slowest step, 3 x the
slowest save in the save and commit phases, never under FLOOR_S; before the first step (warm-up, compilation,
communicators) or the first save, STARTUP_S. Every rank derives the same value from the same records.

Who is to blame: ranks whose heartbeat stopped too (the process is stopped, or gone without its launcher noticing),
else the stalled ranks furthest behind (the others wait for them in a collective); when every rank is stuck at the
same place (all loaders on one stalled file system), all of them. Every live rank then logs the verdict (ranks,
hosts, pids, last phase and step) and the Python stacks of all its threads (faulthandler), kills a stopped process
of its own host (a stopped process never exits, and its launcher would wait for it), leaves the verdict in
RUN_DIR/STALLED for `pretrain launch`, and exits EXIT_STALLED: the last committed checkpoint stands, restart me.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pretrain.atomic_file import write_atomic
from pretrain.exit_codes import EXIT_STALLED

PHASES = ("setup", "data", "forward", "backward", "optimizer", "save", "commit", "validate", "done")
SAVE_PHASES = ("save", "commit", "validate")
FLOOR_S = 300.0  # a derived timeout is never shorter: a slow shared file system, a GC pause, a log flush
STARTUP_S = 900.0  # before anything was measured: the first step (compilation, NCCL set-up), the first save
STEP_FACTOR, SAVE_FACTOR = 10.0, 3.0
VERDICT = "STALLED"


def _key(rank: int) -> str:
    return f"pretrain/progress/{rank}"


class Progress:
    """What this rank is doing, written by the main thread only (one tuple assignment: the watchdog thread never
    sees half an update), and the slowest step and save it measured."""

    def __init__(self) -> None:
        self.state = (0, 0, "setup")  # (how many phases were entered, step, phase)
        self.step_s = 0.0  # slowest step after the first (the first one warms up)
        self.save_s = 0.0
        self._steps = 0

    def enter(self, phase: str, step: int | None = None) -> None:
        seq, old_step, _ = self.state
        self.state = (seq + 1, old_step if step is None else step, phase)

    def step_done(self, seconds: float) -> None:
        self._steps += 1
        if self._steps > 1:
            self.step_s = max(self.step_s, seconds)

    def save_done(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def commit_wait_s(self, bound_s: float) -> float:
        """How long the other ranks wait for rank 0's commit: what the saves measured so far need, within
        `bound_s` (deepspeed.rank0_work_timeout_minutes); the bound itself until a save was measured."""
        if not self.save_s:
            return bound_s
        return min(bound_s, max(FLOOR_S, SAVE_FACTOR * self.save_s))


def timeout_for(phase: str, records: list[dict], fixed_s: float | None) -> float:
    """Seconds without progress after which a rank in `phase` counts as stalled (see the module docstring)."""
    if fixed_s is not None:
        return fixed_s
    if phase in SAVE_PHASES:
        save = max(r["save_s"] for r in records)
        return max(FLOOR_S, SAVE_FACTOR * save) if save else STARTUP_S
    step = max(r["step_s"] for r in records)
    return max(FLOOR_S, STEP_FACTOR * step) if step else STARTUP_S


class Watchdog:
    def __init__(self, progress: Progress, rank: int, world: int, run_dir: Path, timeout_minutes: float | None,
                 on_beat: Any = None) -> None:
        """`on_beat`: called from the watchdog thread at every poll (the run directory's owner heartbeat)."""
        self.progress, self.rank, self.world, self.run_dir = progress, rank, world, Path(run_dir)
        self.fixed_s = None if timeout_minutes is None else 60.0 * timeout_minutes
        shortest = self.fixed_s or FLOOR_S
        self.poll_s = min(10.0, max(0.5, shortest / 20))
        from pretrain import distributed  # here, not at the top: the launcher reads verdicts without torch

        self.store = distributed.rendezvous_store(timeout_s=max(self.poll_s, min(30.0, shortest / 4)))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.on_beat = on_beat
        self._beat = 0
        self._seen: dict[int, dict] = {}  # rank -> {"beat", "seq", "beat_at", "progress_at"}
        self._store_down_since: float | None = None
        self._store_limit_s = self.fixed_s or STARTUP_S  # the longest timeout the last records gave
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)

    def start(self) -> None:
        if self.store is not None:
            self._thread.start()

    def stop(self, done: bool = True) -> None:
        """Before a normal exit (`done`): the last record says `done`, which never counts as stalled. After an
        error the record is left as it was: the others judge this rank by it (its launcher usually ends them
        first)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.poll_s + 1)
        if done and self.store is not None:
            self.progress.enter("done")
            self._publish()

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.on_beat is not None:
                self.on_beat()
            try:
                self._publish()
                records = self._read_all()
                self._store_down_since = None
            except Exception as err:  # the store's host stopped or died: its own verdict after the timeout
                records = None
                self._check_store(err)
            if records is not None and not self._stop.is_set():
                self._store_limit_s = max(timeout_for(r["phase"], records, self.fixed_s) for r in records)
                verdict = self.check(records, time.monotonic())
                if verdict is not None:
                    self._end(verdict)

    def record(self) -> dict:
        seq, step, phase = self.progress.state
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "beat": self._beat, "seq": seq, "step": step,
                "phase": phase, "step_s": self.progress.step_s, "save_s": self.progress.save_s}

    def _publish(self) -> None:
        self._beat += 1
        self.store.set(_key(self.rank), json.dumps(self.record()))

    def _read_all(self) -> list[dict] | None:
        keys = [_key(r) for r in range(self.world)]
        if not self.store.check(keys):  # a rank that has not published yet: not judged before it has
            return None
        return [json.loads(v) for v in self.store.multi_get(keys)]

    def _check_store(self, err: Exception) -> None:
        now = time.monotonic()
        self._store_down_since = self._store_down_since or now
        down = now - self._store_down_since
        if down > self._store_limit_s:
            self._end(f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                      f"(the launcher's, or rank 0's under srun) has not answered for {down:.0f} s: its process is "
                      f"stopped or gone ({type(err).__name__}: {err})")

    # -- the decision -----------------------------------------------------------------------------------------
    def check(self, records: list[dict], now: float) -> dict | None:
        """The verdict on these records (None: every rank is moving)."""
        for rec in records:
            seen = self._seen.get(rec["rank"])
            if seen is None:
                seen = self._seen[rec["rank"]] = {"beat": None, "seq": None, "beat_at": now, "progress_at": now}
            if rec["beat"] != seen["beat"]:
                seen["beat"], seen["beat_at"] = rec["beat"], now
            if rec["seq"] != seen["seq"]:
                seen["seq"], seen["progress_at"] = rec["seq"], now
        stalled = []
        for rec in records:
            seen = self._seen[rec["rank"]]
            limit = timeout_for(rec["phase"], records, self.fixed_s)
            if rec["phase"] != "done" and now - seen["progress_at"] > limit:
                # A live watchdog beats every poll: one silent for several polls belongs to a stopped process.
                stalled.append({**rec, "idle_s": round(now - seen["progress_at"], 1),
                                "silent_s": round(now - seen["beat_at"], 1), "timeout_s": limit,
                                "frozen": now - seen["beat_at"] > max(5 * self.poll_s, limit / 4)})
        if not stalled:
            return None
        frozen = [s for s in stalled if s["frozen"]]
        # In the commit only rank 0 works; the others wait for it in the store.
        working = [s for s in stalled if s["phase"] != "commit" or s["rank"] == 0] or stalled
        if frozen:
            blamed = frozen
        else:
            behind = min((s["step"], PHASES.index(s["phase"])) for s in working)
            blamed = [s for s in working if (s["step"], PHASES.index(s["phase"])) == behind]
        return {"blamed": blamed, "stalled": stalled}

    @staticmethod
    def describe(verdict: dict) -> str:
        def one(s: dict) -> str:
            state = (f"no heartbeat for {s['silent_s']:.0f} s either: the process is stopped or gone"
                     if s["frozen"] else "alive, its main thread is stuck")
            return (f"rank {s['rank']} on {s['host']} (pid {s['pid']}): last phase {s['phase']} at step {s['step']},"
                    f" no progress for {s['idle_s']:.0f} s ({state})")

        blamed = {s["rank"] for s in verdict["blamed"]}
        waiting = [f"rank {s['rank']} ({s['phase']} at step {s['step']})" for s in verdict["stalled"]
                   if s["rank"] not in blamed]
        text = "; ".join(one(s) for s in verdict["blamed"])
        if waiting:
            text += "; waiting for it: " + ", ".join(waiting)
        return f"stalled (timeout {verdict['blamed'][0]['timeout_s']:.0f} s): {text}"

    def _end(self, verdict: dict | str) -> None:
        message = verdict if isinstance(verdict, str) else self.describe(verdict)
        blamed = [] if isinstance(verdict, str) else verdict["blamed"]
        os.write(2, f"[rank {self.rank}] hang watchdog: {message}. Python stacks of rank {self.rank} "
                    f"(pid {self.pid}) follow; exiting {EXIT_STALLED} (the last committed checkpoint stands: "
                    "restart me)\n".encode())
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for s in blamed:  # a stopped process of this host never exits by itself: end it for the launcher
            if s["host"] == self.host and s["frozen"] and s["pid"] != self.pid:
                try:
                    os.kill(s["pid"], signal.SIGKILL)
                except OSError:
                    pass
        try:
            write_atomic(self.run_dir / VERDICT,
                         json.dumps({"message": message, "blamed": blamed, "by_rank": self.rank}) + "\n")
        except OSError:
            pass
        os._exit(EXIT_STALLED)


def read_verdict(run_dir: Path) -> dict | None:
    """The watchdog's verdict a run left (RUN_DIR/STALLED), or None."""
    try:
        return json.loads((Path(run_dir) / VERDICT).read_text())
    except (OSError, ValueError):
        return None
