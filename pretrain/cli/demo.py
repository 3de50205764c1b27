"""`pretrain demo [OUT_DIR]`: the whole pipeline that `make demo` runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data -> tiny VLM on 2 CPU ranks -> export -> captions")
    p.add_argument("out_dir", nargs="?", default="demo_out")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pretrain.demo import run_demo

    return run_demo(args.out_dir, args.nproc, args.train_samples, overrides=args.overrides)
