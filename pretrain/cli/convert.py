"""`pretrain convert CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--max-shard-size SIZE]`: committed checkpoint ->
Hugging Face directory, streamed (the model is never held in memory whole)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="export a committed checkpoint as a Hugging Face model directory")
    p.add_argument("checkpoint", help="a checkpoint tag directory, a run's checkpoints/ folder, or a run directory")
    p.add_argument("out_dir", help="output directory (replaced if it holds an earlier export)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the exported weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB or 5GB")
    p.add_argument("--frozen-from", choices=("checkpoint", "source"), default="checkpoint",
                   help="frozen weights: the checkpoint's copy (training dtype) or the run's sources "
                        "(model.llm/vision/init_from), which the checkpoint's absence of them also selects")
    p.add_argument("--run-config", default=None,
                   help="the run's config.yaml for the sources (default: the run directory's)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write its adapter as a PEFT directory (adapter_config.json, "
                        "adapter_model.safetensors) over model.init_from, instead of the merged model")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pretrain.export.hf import convert

    try:
        out = convert(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size,
                      frozen_from=args.frozen_from, run_config=args.run_config, adapter=args.adapter)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}")
        return 1
    print(out)
    return 0
