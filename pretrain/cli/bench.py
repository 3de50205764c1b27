"""`pretrain bench data|train|shards`: throughput benchmarks against the common practice (see pretrain.bench).

Recipes whose shards do not exist yet (configs/bench/*.yaml name benchdata/train/shard-{000000..000003}.tar) get
photo-like JPEG bench shards generated there first; recipes with an inline decoder and no tokenizer get a local one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_WORK = "runs/bench"


def register(sub: Any) -> None:
    parser = sub.add_parser("bench", help="throughput benchmarks: data loading and training against the usual way")
    bench = parser.add_subparsers(dest="bench_command", metavar="{data,train,shards}", required=True)
    _add_data(bench)
    _add_train(bench)
    _add_shards(bench)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a recipe, e.g. configs/bench/mid.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as in every command")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help="tokenizer and run directories (default runs/bench)")
    p.add_argument("--samples-per-shard", type=int, default=250, help="for generated bench shards")
    p.add_argument("--image-sizes", default=None, help="generated images, e.g. 854x480,1280x720 (default 480p-720p)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    p.add_argument("--record", metavar="RESULTS_MD", help="append the table with date, machine, versions, commit")


def _add_data(bench: Any) -> None:
    p = bench.add_parser("data", help="samples/s per loader worker: ours vs webdataset + the HF image processor")
    _common_options(p)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per path and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per path and round")
    p.add_argument("--workers", type=int, default=1, help="loader worker processes per path (0: in-process)")
    p.add_argument("--gpu", default="h100", help="the target GPU whose consumption at 50%% MFU the loader is held "
                   "against (a key of pretrain.model.flops.PEAK_FLOPS, e.g. h100, h200, a100)")
    p.set_defaults(handler=cmd_data)


def _add_train(bench: Any) -> None:
    p = bench.add_parser("train", help="tokens/s, MFU, memory, data wait of our Trainer (and the peer with --peer)")
    _common_options(p)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per trainer")
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps left out (default: min(3, steps/3))")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: one per GPU, else 1)")
    p.add_argument("--peer", action="store_true", help="also train with transformers' Trainer + DeepSpeed")
    p.add_argument("--peer-batch", type=int, default=None,
                   help="peer samples per micro-batch (default: ours' measured samples per micro-batch)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per trainer before it is stopped")
    p.set_defaults(handler=cmd_train)


def _add_shards(bench: Any) -> None:
    p = bench.add_parser("shards", help="write photo-like JPEG bench shards (what bench data/train generate)")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--image-sizes", default=None, help="e.g. 854x480,1280x720 (default 480p-720p)")
    p.add_argument("--workers", type=int, default=1, help="processes drawing and encoding images")
    p.set_defaults(handler=cmd_shards)


def _error(message: str) -> int:
    print(f"pretrain bench: {message}", file=sys.stderr)
    return 2


def _sizes(text: str | None) -> tuple[tuple[int, int], ...]:
    from pretrain.bench.inputs import PHOTO_SIZES, parse_sizes

    return PHOTO_SIZES if text is None else parse_sizes(text)


def _prepare(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from pretrain.bench.inputs import with_local_inputs
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    return with_local_inputs(cfg, args.work_dir, args.samples_per_shard, _sizes(args.image_sizes))


SECTIONS = {"data": "Data loading: `pretrain bench data`",
            "train": "Training throughput: `pretrain bench train`"}


def _finish(args: argparse.Namespace, title: str, header: list[str], rows: list[list], result: dict,
            notes: str = "") -> int:
    from pretrain.bench.report import environment, markdown_table, record

    env = environment(_command(args))
    text = markdown_table(header, rows) + (f"\n\n{notes}" if notes else "")
    print(text)
    if args.record:
        record(args.record, SECTIONS[args.bench_command], title, env, text)
        print(f"recorded in {args.record}")
    if args.json:
        print(json.dumps({**result, "environment": env}))
    return 0


def _command(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces this run, every option spelled out (defaults included)."""
    words = ["pretrain", "bench", args.bench_command]
    for key, value in vars(args).items():
        if key in ("command", "bench_command", "handler", "overrides") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return words + args.overrides


def cmd_data(args: argparse.Namespace) -> int:
    from pretrain.config import ConfigError

    try:
        cfg, urls = _prepare(args)
        from pretrain.model.processing import build_processing

        processing = build_processing(cfg)
    except (ConfigError, OSError, ValueError) as err:
        return _error(str(err))
    from pretrain.bench.data import bench_data, demand_note, gpu_demand, table

    size = processing.image_processor.crop_size or processing.image_processor.size
    print(f"bench data: {len(urls)} shard(s), {type(processing.image_processor).__name__} {dict(size)}, "
          f"{processing.image_tokens} image tokens, micro-batch {cfg.train.micro_batch_size}, "
          f"packing {cfg.data.packing}, {args.workers} worker(s), {args.rounds} x {args.seconds:g} s per path",
          flush=True)
    result = bench_data(cfg, processing, urls, args.workers, args.seconds, args.rounds, args.warmup)
    header, rows = table(result, args.workers)
    ours = result["ours-fast" if cfg.data.fast_image_decode else "ours"]
    try:
        demand = gpu_demand(cfg, ours["tokens_per_sample"], args.gpu, ours["samples_per_s"], args.workers)
    except (ConfigError, ValueError) as err:
        return _error(str(err))
    return _finish(args, f"bench data: {Path(args.config).name}, {args.workers} worker(s)", header, rows,
                   {"data": result, "gpu": demand}, demand_note(demand))


def cmd_train(args: argparse.Namespace) -> int:
    from pretrain.config import ConfigError

    try:
        cfg, _ = _prepare(args)
    except (ConfigError, OSError, ValueError) as err:
        return _error(str(err))
    from pretrain.bench.train import bench_train, table

    try:
        result = bench_train(cfg, Path(args.work_dir), args.steps, args.nproc, args.peer, args.peer_batch,
                             args.warmup_steps, args.timeout)
    except RuntimeError as err:
        return _error(str(err))
    header, rows, notes = table(result)
    return _finish(args, f"bench train: {Path(args.config).name}", header, rows, {"train": result}, notes)


def cmd_shards(args: argparse.Namespace) -> int:
    from pretrain.bench.inputs import write_bench_shards

    try:
        paths = write_bench_shards(args.out, args.shards, args.samples_per_shard, _sizes(args.image_sizes),
                                   workers=args.workers)
    except ValueError as err:
        return _error(str(err))
    print(f"{len(paths)} shard(s) x {args.samples_per_shard} samples -> {args.out}")
    return 0
