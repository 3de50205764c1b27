"""`pretrain convert CHECKPOINT OUT_DIR [--dtype bf16|fp32]`: committed checkpoint -> Hugging Face directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="export a committed checkpoint as a Hugging Face model directory")
    p.add_argument("checkpoint", help="a checkpoint tag directory, a run's checkpoints/ folder, or a run directory")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pretrain.export.hf import convert

    try:
        out = convert(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 1
    print(out)
    return 0
