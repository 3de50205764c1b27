"""Shard URL expansion: the one reading of a `urls` value, shared by training, eval, bench and the shard commands.

Each item is brace-expanded (`shard-{000000..000099}.tar`), then each result is
- a `pipe:`, http(s) or cloud-storage URL: passed through (read as a stream);
- a glob (`data/*.tar`, quoted so the shell leaves it to us): the matching files, sorted;
- a directory: the shards its `manifest.json` lists, in manifest order, else its `*.tar`, sorted;
- anything else: a shard path, kept as given (a missing file is reported by the caller that reads it).
A glob matching nothing, a missing directory (a path ending in `/` or without a suffix) and a directory without
shards are errors that name the pattern.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import braceexpand

MANIFEST_NAME = "manifest.json"
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")
_GLOB_CHARS = ("*", "?", "[")


def is_remote(url: str) -> bool:
    """A stream (`pipe:`, http(s), cloud storage): read front to back, its sample count unknown in advance."""
    return url.startswith(REMOTE_PREFIXES)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Every shard URL that `urls` (one pattern or a list) names, in order; FileNotFoundError names a pattern that
    names nothing."""
    out: list[str] = []
    for pattern in [urls] if isinstance(urls, str) else list(urls):
        for url in braceexpand.braceexpand(pattern):
            out += _expand_one(url, pattern)
    return out


def _expand_one(url: str, pattern: str) -> list[str]:
    if is_remote(url):
        return [url]
    path = Path(url).expanduser()
    if path.is_dir():
        return _directory_shards(path, pattern)
    if any(c in url for c in _GLOB_CHARS) and not path.exists():
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise FileNotFoundError(f"{pattern}: the pattern matches no file")
        return matches
    if url.endswith("/") or not path.suffix:
        raise FileNotFoundError(f"{pattern}: no such shard directory: {url}")
    return [url]


def _directory_shards(path: Path, pattern: str) -> list[str]:
    """A shard directory: its manifest's shards first (the order it was written in), else its tars."""
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["shards"]
            return [str(path / s["url"]) for s in listed]
        except (ValueError, KeyError, TypeError) as err:
            raise FileNotFoundError(f"{pattern}: {manifest} cannot be read ({type(err).__name__}: {err})") from err
    tars = sorted(str(p) for p in path.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{pattern}: the directory holds no {MANIFEST_NAME} and no *.tar")
    return tars


def missing_shards(urls: list[str]) -> list[str]:
    """The local shards among `urls` that are not files (remote ones cannot be checked without reading them)."""
    return [u for u in urls if not is_remote(u) and not Path(u).expanduser().is_file()]
