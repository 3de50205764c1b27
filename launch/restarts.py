"""Restart after a failure, bounded: one policy for `pretrain launch --max-restarts N` (in-job restart) and the sbatch
template (requeue), which calls this module as `python -m pretrain.launch.restarts`.

A run that failed (a crash, a hang the watchdog ended, a killed rank) after committing a newer checkpoint than it
started from is restarted: it resumes there and loses at most the steps since. One failure without a new checkpoint
is tried once more (a transient fault: a node that went bad, a file system hiccup; Slurm leaves the failed node out
where it can); a second failure in a row without a new checkpoint stops: the cause does not go away by itself.
A config error (and a run directory owned by another live job) is never restarted, and the restart budget bounds all.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.exit_codes import NOT_RESTARTABLE
from pretrain.train import checkpoint as ckpt
from pretrain.train.watchdog import read_verdict

FAILURES_IN_A_ROW_LIMIT = 2


@dataclass
class Decision:
    restart: bool
    message: str
    failures_in_a_row: int  # failures since the last new checkpoint, this one included


def newest_step(run_dir: str | Path) -> int | None:
    """The step of the newest committed, intact checkpoint of a run (None: none yet)."""
    found = ckpt.find_resume(Path(run_dir) / "checkpoints")
    return None if found is None else ckpt.step_of(found.name)


def decide(code: int, started: int | None, newest: int | None, failures_in_a_row: int, restarts: int,
           max_restarts: int) -> Decision:
    """After a failed attempt (exit `code`) that started from checkpoint step `started` and left `newest`; the
    previous failures without a new checkpoint in between, and the restarts done so far."""
    progressed = newest is not None and (started is None or newest > started)
    in_a_row = 0 if progressed else failures_in_a_row + 1
    where = f"step {newest}" if newest is not None else "the start (no checkpoint yet)"
    if code in NOT_RESTARTABLE:
        return Decision(False, f"exit {code} is not worth a restart (the same command fails the same way)", in_a_row)
    if restarts >= max_restarts:
        return Decision(False, f"failed (exit {code}) after {restarts} restart(s), the limit: giving up; the run "
                               f"resumes from {where} when started again", in_a_row)
    if in_a_row >= FAILURES_IN_A_ROW_LIMIT:
        return Decision(False, f"failed (exit {code}) {in_a_row} times in a row without a new checkpoint (newest: "
                               f"{where}): giving up, the cause is not transient; see the log above", in_a_row)
    why = ("a newer checkpoint was committed" if progressed
           else "no new checkpoint since the last start: one more try")
    return Decision(True, f"failed (exit {code}); {why}: restart {restarts + 1} of at most {max_restarts}, "
                          f"resuming from {where}", in_a_row)


def stalled_hosts(run_dir: str | Path) -> list[str]:
    """The hosts of the ranks the hang watchdog blamed, if it ended the run (for Slurm to leave out)."""
    verdict = read_verdict(Path(run_dir))
    return sorted({b["host"] for b in verdict["blamed"]}) if verdict else []


def main(argv: list[str] | None = None) -> int:
    """`after RUN_DIR --code C --started S --state F --restarts R --max-restarts M`, after a failed attempt that
    started from checkpoint step S (`none`: from scratch): decide (the failures in a row kept in file F), print the
    reason (and `exclude: HOSTS` when the watchdog blamed some) and exit 0 to restart, 3 to stop."""
    p = argparse.ArgumentParser(prog="python -m pretrain.launch.restarts")
    p.add_argument("what", choices=["after"])
    p.add_argument("run_dir")
    p.add_argument("--code", type=int)
    p.add_argument("--started", default="none")
    p.add_argument("--state")
    p.add_argument("--restarts", type=int, default=0)
    p.add_argument("--max-restarts", type=int, default=0)
    args = p.parse_args(argv)
    state = Path(args.state)
    in_a_row = json.loads(state.read_text())["failures_in_a_row"] if state.is_file() else 0
    started = None if args.started == "none" else int(args.started)
    decision = decide(args.code, started, newest_step(args.run_dir), in_a_row, args.restarts, args.max_restarts)
    state.write_text(json.dumps({"failures_in_a_row": decision.failures_in_a_row}) + "\n")
    print(decision.message)
    hosts = stalled_hosts(args.run_dir)
    if hosts:
        print("exclude: " + ",".join(hosts))
    return 0 if decision.restart else 3


if __name__ == "__main__":
    sys.exit(main())
