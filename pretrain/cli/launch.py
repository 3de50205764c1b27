"""`pretrain launch CONFIG --nproc N [key=value ...]`: N local training processes through torchrun."""

from __future__ import annotations

import argparse

from launch.local import launch_local


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run N local training processes (torchrun underneath)")
    p.add_argument("config")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (one per GPU, or CPU ranks)")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return launch_local(args.config, args.nproc, args.overrides, master_port=args.master_port)
