"""What the benchmarks run on, made locally: photo-like JPEG shards with captions, and a tokenizer for recipes
whose decoder is an inline (random-init) config with no tokenizer of its own.

The images are smooth colour fields with hard edges and grain at 480p-720p, so they compress and decode like
photos (pure noise would make JPEG decoding unrealistically slow, flat colour unrealistically fast). Captions are
10-60 words, LLaVA-Pretrain-like to LLaVA-Instruct-like in length.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.config import Config
from pretrain.data.urls import expand_urls, is_remote
from pretrain.shards.writer import ShardWriter, write_manifest

# 480p-720p, landscape and portrait: what web-scale caption data mostly holds after img2dataset resizing.
PHOTO_SIZES: tuple[tuple[int, int], ...] = ((854, 480), (640, 480), (1024, 576), (1280, 720), (720, 960))
WORDS = (
    "a an the of in on at with and near under over behind beside between two three several small large old young "
    "red green blue yellow white black brown grey orange wooden stone glass metal bright dark sunny cloudy quiet busy "
    "man woman child dog cat bird horse car bus bicycle train boat street road bridge river lake sea beach mountain "
    "hill forest tree flower field garden park house building window door roof wall table chair bed kitchen plate "
    "cup bottle book phone computer screen sign light shadow sky cloud sun snow rain water grass sand rock fence "
    "standing sitting walking running holding looking riding eating playing parked covered filled surrounded shown "
    "view photo picture image close-up background foreground left right center top bottom front side corner edge"
).split()
_SHARD_NAME = re.compile(r"^shard-(\d{6})\.tar$")


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields, hard-edged regions and grain."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(20, 200, 3), rng.uniform(20, 200, 3), rng.uniform(0, 6.3, 3)
    base = np.stack([np.sin(x / fx[c] + phase[c]) * np.cos(y / fy[c]) for c in range(3)], axis=-1) * 90 + 128
    for _ in range(int(rng.integers(2, 6))):  # a few flat-shaded rectangles: edges and blocks of colour
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = int(rng.integers(x0 + 4, width)), int(rng.integers(y0 + 4, height))
        base[y0:y1, x0:x1] = base[y0:y1, x0:x1] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    base += rng.normal(0, 6, base.shape).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def caption(rng: np.random.Generator, low: int = 10, high: int = 60) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(low, high + 1)))
    return " ".join(words).capitalize() + "."


def bench_sample(index: int, sizes: tuple[tuple[int, int], ...], seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, index])
    width, height = sizes[index % len(sizes)]
    buf = io.BytesIO()
    photo_like(width, height, rng).save(buf, "JPEG", quality=90)
    text = caption(rng)
    return {"__key__": f"bench-{index:08d}", "jpg": buf.getvalue(), "txt": text,
            "json": json.dumps({"caption": text, "width": width, "height": height})}


def write_bench_shards(out_dir: str | Path, shards: int, samples_per_shard: int,
                       sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES, seed: int = 0, workers: int = 1) -> list[str]:
    """`out_dir/shard-NNNNNN.tar` + manifest.json, the same bytes for the same arguments whatever `workers` (the
    processes drawing and encoding images). Returns the shard paths."""
    out = Path(out_dir)
    n = shards * samples_per_shard
    make = functools.partial(bench_sample, sizes=sizes, seed=seed)
    with ShardWriter(out, samples_per_shard=samples_per_shard) as writer:
        if workers > 1 and n >= 64:  # below that, starting the processes costs more than it saves
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
            with ctx.Pool(workers) as pool:
                for sample in pool.imap(make, range(n), chunksize=8):
                    writer.write(sample)
        else:
            for i in range(n):
                writer.write(make(i))
    write_manifest(out, writer.shards, extra={"source": "bench", "seed": seed, "sizes": [list(s) for s in sizes]})
    return [str(out / s["url"]) for s in writer.shards]


def ensure_bench_shards(urls: list[str], samples_per_shard: int,
                        sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES) -> bool:
    """Write the bench shards a recipe names (`DIR/shard-{000000..00000N}.tar`) when none of them exists yet.

    Returns True if it wrote them. Shards that exist are used as they are (a user's own data included); a set that
    exists only in part, or names that are not bench shard names, is an error rather than a silent mix."""
    paths = [Path(u) for u in urls]
    existing = [p for p in paths if p.is_file()]
    if any(is_remote(u) for u in urls) or len(existing) == len(paths):
        return False
    numbers = [_SHARD_NAME.match(p.name) for p in paths]
    expected = [f"{i:06d}" for i in range(len(paths))]
    if existing or len({p.parent for p in paths}) != 1 or [m and m.group(1) for m in numbers] != expected:
        raise FileNotFoundError(f"missing shards ({len(paths) - len(existing)} of {len(paths)}, e.g. "
                                f"{next(p for p in paths if not p.is_file())}); benchmark shards are generated only "
                                "for a complete set named DIR/shard-{000000..N}.tar")
    write_bench_shards(paths[0].parent, len(paths), samples_per_shard, sizes, workers=min(8, os.cpu_count() or 1))
    return True


def bench_tokenizer(out_dir: str | Path, vocab_size: int = 4000) -> Path:
    """A byte-level BPE trained on the bench vocabulary, with a chat template; saved (and reused) in `out_dir`."""
    from pretrain.model.tiny import build_tokenizer

    out = Path(out_dir)
    if not (out / "tokenizer.json").is_file():
        rng = np.random.default_rng(0)
        build_tokenizer([caption(rng) for _ in range(2000)], vocab_size=vocab_size).save_pretrained(out)
    return out


def with_local_inputs(cfg: Config, work_dir: str | Path, samples_per_shard: int,
                      sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES) -> tuple[Config, list[str]]:
    """The config with a local tokenizer where its decoder has none (the decoder keeps its real vocabulary size:
    the tokenizer only has to produce ids below it), and the bench shards it names generated when missing."""
    cfg = cfg.model_copy(deep=True)
    m = cfg.model
    if m.tokenizer is None and m.init_from is None and isinstance(m.llm, dict):
        m.tokenizer = str(bench_tokenizer(Path(work_dir) / "tokenizer"))
    for source in cfg.data.train:
        ensure_bench_shards(expand_urls(source.urls), samples_per_shard, sizes)
    return cfg, [u for s in cfg.data.train for u in expand_urls(s.urls)]


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`854x480,1280x720` -> ((854, 480), (1280, 720))."""
    try:
        sizes = tuple((int(w), int(h)) for w, h in (item.lower().split("x") for item in text.split(",")))
    except ValueError:
        raise ValueError(f"image sizes must look like 854x480,1280x720 (got {text!r})") from None
    if not sizes or any(w < 16 or h < 16 for w, h in sizes):
        raise ValueError(f"image sizes must be at least 16x16 (got {text!r})")
    return sizes
