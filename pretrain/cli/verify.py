"""`pretrain shards verify URLS --config CONFIG`: every sample once through the training decode + preprocess +
tokenize path; the last line of output is `{"ok": n, "skipped": {"reason": n, ...}}`.

Exit 0 whenever the config and the shards could be read (bad samples and truncated shards are counted, not fatal);
2 when the config cannot be loaded or a URL names no shard.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.cli.shards import subcommands


def register(sub: Any) -> None:
    p = subcommands(sub).add_parser("verify", help="run every sample through the training data path, count skips")
    p.add_argument("urls", nargs="+", metavar="URLS [key=value ...]",
                   help="shards (brace patterns, quoted globs, pipe:, http) or shard directories, then config "
                        "overrides as in every command, e.g. data.max_length=4096")
    p.add_argument("--config", required=True, help="the training config (tokenizer, vision tower, data settings)")
    p.add_argument("--workers", type=int, default=1, help="processes, each verifying whole shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run, overrides=[])


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(shard URLs, overrides): `key.sub=value` words among the positionals (a URL has `:` or `/` before any
    `=`) and those after the flags."""
    words = [*args.urls, *args.overrides]
    overrides = [w for w in words if _OVERRIDE.match(w) and not Path(w).exists()]
    return [w for w in words if w not in overrides], overrides


def _error(message: str) -> int:
    print(f"pretrain shards verify: {message}", file=sys.stderr)
    return 2


def _shard_urls(patterns: list[str]) -> list[str]:
    from pretrain.data.urls import expand_urls, missing_shards

    urls = expand_urls(patterns)
    missing = missing_shards(urls)
    if missing:
        raise FileNotFoundError(f"no such shard: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                    if len(missing) > 1 else ""))
    if not urls:
        raise FileNotFoundError(f"{' '.join(patterns)} names no shards")
    return urls


def run(args: argparse.Namespace) -> int:
    from pretrain.config import ConfigError, load_config

    patterns, overrides = split_overrides(args)
    cfg = load_config(args.config, overrides)  # a ConfigError is reported by pretrain.cli.main
    try:
        urls = _shard_urls(patterns)
    except FileNotFoundError as err:
        return _error(str(err))
    from pretrain.model.processing import build_processing
    from pretrain.shards.verify import verify_shards

    try:
        processing = build_processing(cfg)
    except (ConfigError, OSError, ValueError) as err:  # no tokenizer, a vision tower that cannot be read
        return _error(f"cannot build the data path from {args.config}: {err}")
    start = time.perf_counter()
    report = verify_shards(urls, processing.processor, args.workers, _progress(len(urls), args.no_progress))
    seconds = time.perf_counter() - start
    truncated = sum(s.truncated_text for s in report.shards)
    n = report.ok + sum(report.skipped.values())
    images = ", ".join(f"{k}: {c}" for k, c in report.images_per_sample.items()) or "none"
    print(f"ok samples by images (or tiles and frames) per sample: {images}")
    kinds = ", ".join(f"{k}: {c}" for k, c in report.samples_by_kind.items()) or "none"
    print(f"ok samples by kind: {kinds}")
    print(f"{len(urls)} shard(s), {n} sample(s) in {seconds:.1f} s: {report.ok} ok "
          f"({truncated} with text cut to data.max_length={cfg.data.max_length}), "
          f"{sum(report.skipped.values())} skipped")
    print(json.dumps(report.summary()), flush=True)
    return 0


def _progress(total: int, disabled: bool) -> Any:
    """Per-shard callback: a progress bar on stderr, and each shard's problems (a cut tar, a crash) as it ends."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="shard", desc="verify", disable=disabled, file=sys.stderr)

    def on_shard(shard: Any) -> None:
        bar.update(1)
        for line in ([shard.problem] if shard.problem else []) + shard.notes:
            bar.write(line, file=sys.stderr)
        if bar.n == total:
            bar.close()

    return on_shard
