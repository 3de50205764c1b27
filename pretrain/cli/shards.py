"""`pretrain shards ...`: build WebDataset shards from user data or the synthetic set, and inspect shard sets.

`register(subparsers)` adds the `shards` command. Other modules add `shards X` sub-commands of their own through
`subcommands(subparsers)` (the hook for `shards verify`, which lives in its own module and registers after this one).
Every sub-command sets `handler`, taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pretrain.shards.image_check import DEFAULT_MAX_PIXELS, REENCODE_FORMATS
from pretrain.shards.writer import DEFAULT_MAX_SHARD_BYTES, DEFAULT_SAMPLES_PER_SHARD


def register(subparsers: Any) -> Any:
    """Add `shards` to the top-level sub-commands; returns the `shards` sub-command action (the hook for `verify`)."""
    parser = subparsers.add_parser("shards", help="build and inspect WebDataset shards")
    sub = parser.add_subparsers(dest="shards_command",
                                metavar="{synthetic,llava,jsonl,folder,interleaved,parquet,inspect,...}")
    sub.required = True
    _add_synthetic(sub)
    _add_llava(sub)
    _add_jsonl(sub)
    _add_folder(sub)
    _add_interleaved(sub)
    _add_parquet(sub)
    _add_inspect(sub)
    parser.set_defaults(_shards_subcommands=sub)
    return sub


def subcommands(subparsers: Any) -> Any:
    """The `shards` sub-command action, for a module adding e.g. `shards verify`: `subcommands(sub).add_parser(...)`
    where `sub` is the top-level sub-parsers action that `register` was given."""
    return subparsers.choices["shards"].get_default("_shards_subcommands")


def _add_synthetic(sub: Any) -> None:
    p = sub.add_parser("synthetic", help="the grounded synthetic shapes data set (train/ and val/ shard dirs)")
    p.add_argument("--out", required=True, help="output directory; train/ and val/ are created inside")
    p.add_argument("--train", type=int, required=True, help="number of training samples")
    p.add_argument("--val", type=int, required=True, help="number of validation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(handler=cmd_synthetic)


def _add_conversion_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    p.add_argument("--workers", type=int, default=1, help="processes reading and checking images (output unchanged)")
    p.add_argument(
        "--reencode",
        choices=sorted(REENCODE_FORMATS),
        help="re-encode images as RGB in this format (default: keep the original bytes)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality with --reencode")
    p.add_argument("--max-side", type=int, help="with --reencode: shrink images whose long side is larger")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are decompression bombs")
    p.add_argument("--full-decode", action="store_true", help="decode every image fully to find corrupt JPEG data")
    p.add_argument("--overwrite", action="store_true", help="replace a previous build in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_llava(sub: Any) -> None:
    p = sub.add_parser("llava", help="LLaVA-format JSON (conversations with <image>) + an image folder -> shards")
    p.add_argument("--json", required=True, help="the LLaVA JSON array (or .jsonl)")
    p.add_argument("--image-root", required=True, help="folder the records' image paths are relative to")
    _add_conversion_options(p)
    p.set_defaults(handler=cmd_llava)


def _add_jsonl(sub: Any) -> None:
    p = sub.add_parser("jsonl", help="JSON lines or CSV/TSV with an image path and a caption or conversations")
    p.add_argument("--file", required=True, help=".jsonl, .csv or .tsv file")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "tsv"], help="default: by suffix")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", help="default: 'caption', else 'text'")
    p.add_argument("--conversations-column", default="conversations", help="LLaVA-style turns (JSON text in CSV)")
    _add_conversion_options(p)
    p.set_defaults(handler=cmd_jsonl)


def _add_folder(sub: Any) -> None:
    p = sub.add_parser("folder", help="a folder of images with a .txt caption beside each")
    p.add_argument("--images", required=True, help="folder searched recursively")
    _add_conversion_options(p)
    p.set_defaults(handler=cmd_folder)


def _add_interleaved(sub: Any) -> None:
    p = sub.add_parser("interleaved", help='interleaved documents (JSON lines of {"texts": [...], "images": [...]}, '
                       "null where the other list holds the item, as OBELICS / MMC4 store them) -> shards")
    p.add_argument("--file", required=True, help="the .jsonl file of documents")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    _add_conversion_options(p)
    p.set_defaults(handler=cmd_interleaved)


def _add_parquet(sub: Any) -> None:
    p = sub.add_parser("parquet", help="Hub-style Parquet with the images inside (LLaVA-OneVision-Data, The Cauldron, "
                       "...), a folder of it, or a datasets save_to_disk directory -> shards")
    p.add_argument("--file", required=True, help="a .parquet file, a quoted glob ('data/*.parquet'), a folder of "
                   "Parquet files (searched recursively) or a save_to_disk directory")
    p.add_argument("--image-column", help="image struct {bytes, path}, bytes, path, or a list of them; 'none': text "
                   "only (default: 'images', else 'image')")
    p.add_argument("--text-column", help="conversations (from/value), messages (role/content), texts (user/assistant)"
                   " or a caption string (default: the first of conversations, messages, texts, caption, text)")
    p.add_argument("--split", help="one split of a folder or a save_to_disk DatasetDict (e.g. train)")
    p.add_argument("--image-root", help="folder that image paths in the table are relative to (default: its folder)")
    _add_conversion_options(p)
    p.set_defaults(handler=cmd_parquet)


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="counts, sizes, keys and a few samples of a shard set")
    p.add_argument("urls", nargs="+", help="shards (brace patterns, quoted globs, pipe:, http) or shard directories")
    p.add_argument("--samples", type=int, default=3, help="how many samples to show")
    p.add_argument("--scan", action="store_true", help="read every tar's headers even where a manifest exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_inspect)


def cmd_synthetic(args: argparse.Namespace) -> int:
    from pretrain.shards.synthetic import write_synthetic

    result = write_synthetic(args.out, args.train, args.val, args.seed, args.samples_per_shard, args.image_size)
    for split, info in result.items():
        print(f"{split}: {info['samples']} samples in {info['shards']} shards -> {info['urls'] or info['dir']}")
    return 0


def _options(args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    from pretrain.shards.build import BuildOptions

    return BuildOptions(
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        workers=args.workers,
        reencode=args.reencode,
        reencode_quality=args.quality,
        max_side=args.max_side,
        max_pixels=args.max_pixels,
        full_decode=args.full_decode,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        extra=extra,
    )


def _build(args: argparse.Namespace, source: str, read: Any, extra: dict[str, Any]) -> int:
    """Run one converter; input problems that stop the whole conversion are printed, exit code 2."""
    from pretrain.shards.build import build_shards

    if args.max_side and not args.reencode:
        print("error: --max-side needs --reencode (original bytes are kept otherwise)", file=sys.stderr)
        return 2
    try:
        items, total = read()
        manifest = build_shards(items, args.out, _options(args, extra), source, total)
    except (OSError, ValueError) as e:  # missing input file, broken top-level JSON, an old build in --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{r} {n}" for r, n in manifest["skipped_by_reason"].items()) or "none"
    print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards -> {Path(args.out) / 'manifest.json'}")
    print(f"skipped {manifest['num_skipped']}: {skipped}")
    if manifest["num_samples"] == 0:
        print("error: no usable samples", file=sys.stderr)
        return 1
    return 0


def cmd_llava(args: argparse.Namespace) -> int:
    from pretrain.shards.sources import read_llava

    extra = {"input": args.json, "image_root": args.image_root}
    return _build(args, "llava", lambda: read_llava(args.json, args.image_root), extra)


def cmd_jsonl(args: argparse.Namespace) -> int:
    from pretrain.shards.sources import read_table

    def read() -> Any:
        return read_table(
            args.file,
            args.image_root,
            image_column=args.image_column,
            caption_column=args.caption_column,
            conversations_column=args.conversations_column,
            fmt=args.format,
        )

    return _build(args, "jsonl", read, {"input": args.file, "image_root": args.image_root})


def cmd_folder(args: argparse.Namespace) -> int:
    from pretrain.shards.sources import read_folder

    return _build(args, "folder", lambda: read_folder(args.images), {"input": args.images})


def cmd_interleaved(args: argparse.Namespace) -> int:
    from pretrain.shards.sources import read_interleaved

    extra = {"input": args.file, "image_root": args.image_root}
    return _build(args, "interleaved", lambda: read_interleaved(args.file, args.image_root), extra)


def cmd_parquet(args: argparse.Namespace) -> int:
    from pretrain.shards.hub_tables import read_hub_tables

    def read() -> Any:
        return read_hub_tables(args.file, image_column=args.image_column, text_column=args.text_column,
                               split=args.split, image_root=args.image_root)

    extra = {"input": args.file, "split": args.split}
    return _build(args, "parquet", read, extra)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pretrain.shards.inspection import format_report, inspect_shards

    try:
        report = inspect_shards(args.urls, num_examples=args.samples, scan=args.scan)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report.get("errors") else 0
