"""`pretrain launch CONFIG --nproc N [key=value ...]`: N local training processes through torchrun.

Exit codes: 0 done, 2 config error, 75 preempted (a signal made the run commit a checkpoint; the same command
resumes it), 76 the hang watchdog ended the run, anything else a failure. Signals sent to this command reach every
training process. `--max-restarts N`: after a failure the run restarts from its newest checkpoint, up to N times;
two failures in a row without a new checkpoint stop it."""

from __future__ import annotations

import argparse

from pretrain.exit_codes import SHUTDOWN_TIMEOUT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run N local training processes (torchrun underneath)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine: one per GPU (default: all visible GPUs), or N CPU ranks "
                        "(default without GPUs: 1)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--shutdown-timeout", type=int, default=SHUTDOWN_TIMEOUT,
                   help="after a signal, seconds the processes get to checkpoint and exit before they are killed "
                        f"(default {SHUTDOWN_TIMEOUT})")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart after a failure (a crash, a hang, a killed rank), resuming from the newest checkpoint,"
                        " up to N times; two failures in a row without a new checkpoint stop (default 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pretrain.launch.local import launch_local

    return launch_local(args.config, args.nproc, args.overrides, master_port=args.master_port,
                        shutdown_timeout=args.shutdown_timeout, max_restarts=args.max_restarts)
