"""`pretrain eval CONFIG --checkpoint PATH [key=value ...]`: validation loss and the task metrics of a checkpoint,
printed as one JSON object (the last line of the output)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss, perplexity and task metrics of a checkpoint, as JSON")
    p.add_argument("config", help="the run's config (its data.val is evaluated; a run directory's config.yaml)")
    p.add_argument("--checkpoint", required=True,
                   help="a committed checkpoint tag directory, a run's checkpoints/ folder, or a run directory")
    p.add_argument("--samples", type=int, default=200, help="validation samples to evaluate (the first N)")
    p.add_argument("--retrieval", choices=("auto", "contrastive", "likelihood"), default="auto",
                   help="image-text similarity: contrastive heads (auto: when trained) or caption likelihood")
    p.add_argument("--retrieval-samples", type=int, default=100,
                   help="samples in the retrieval gallery (likelihood retrieval costs N^2 decoder passes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tasks", default="loss,captioning,vqa,retrieval",
                   help="comma-separated subset of loss,captioning,vqa,retrieval")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--output", default=None, help="also write the JSON object to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pretrain.config import ConfigError, load_config
    from pretrain.eval.run import TASKS, EvalOptions, evaluate

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    if args.samples < 1 or args.retrieval_samples < 0 or args.batch_size < 1:
        print("error: --samples and --batch-size must be >= 1, --retrieval-samples >= 0")
        return 2
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        print(f"error: --tasks {args.tasks!r}: unknown {unknown}; valid: {','.join(TASKS)}")
        return 2
    opts = EvalOptions(samples=args.samples, retrieval_samples=args.retrieval_samples, retrieval=args.retrieval,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device, tasks=tasks)
    try:
        result = evaluate(cfg, args.checkpoint, opts)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 1
    text = json.dumps(_json_safe(result), allow_nan=False)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text, flush=True)
    return 0


def _json_safe(value):
    """NaN / infinity (a metric with nothing to measure) as null: strict JSON for any reader."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
