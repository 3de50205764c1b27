"""Converting user data (LLaVA JSON, JSON lines / CSV, image folders, Hub tables) into WebDataset shards.

A source reader (`sources.py`) turns the input into an ordered stream of `Job`s (one per sample: its
metadata and where its image and caption live) and `Skip`s (inputs already known to be bad, e.g. a broken JSON line).
Workers read and check the image bytes in parallel; results come back in input order, so the shards are the same
bytes whatever the worker count. Every input ends up either in a shard or in the manifest's `skipped` list.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretrain.data.errors import (
    BAD_UTF8,
    EMPTY_TEXT,
    MISSING_IMAGE,
    MISSING_TEXT,
    MISSING_VIDEO,
    UNSUPPORTED_VIDEO,
    SampleError,
)
from pretrain.data.image_formats import IMAGE_EXTENSIONS
from pretrain.data.sample import sample_kind
from pretrain.data.video import VIDEO_EXTENSIONS, probe
from pretrain.shards.image_check import DEFAULT_MAX_PIXELS, check_image, reencode
from pretrain.shards.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_SAMPLES_PER_SHARD,
    ShardWriter,
    clear_shard_dir,
    write_manifest,
)


@dataclass(frozen=True)
class Job:
    """One input sample. `meta` becomes KEY.json; the image (and, for folders, the caption file) is read by a worker."""

    index: int
    input: str  # where it came from, for the manifest: "data.json#12", "data.csv:7", "cats/001.jpg"
    meta: dict[str, Any]
    image_path: str | None = None
    caption_path: str | None = None  # read in the worker into meta["caption"]
    caption: bool = False  # a caption sample: also write KEY.txt
    image_paths: tuple[str, ...] = ()  # several images: written as KEY.0.ext, KEY.1.ext, ... in this order
    image_data: tuple[bytes, ...] = ()  # images read with the input (a table that embeds them): one is KEY.ext,
    # several KEY.0.ext, KEY.1.ext, ...
    video_path: str | None = None  # a clip: written as KEY.<container>, its probe in meta["video"]


@dataclass(frozen=True)
class Skip:
    """An input that will not become a sample, and why."""

    index: int
    input: str
    reason: str
    detail: str = ""

    def record(self) -> dict[str, str]:
        entry = {"input": self.input, "reason": self.reason}
        if self.detail:
            entry["detail"] = self.detail
        return entry


@dataclass(frozen=True)
class BuildOptions:
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    workers: int = 1
    reencode: str | None = None  # None keeps the original bytes; "jpg" / "png" / "webp" re-encodes as RGB
    reencode_quality: int = 95
    max_side: int | None = None  # with reencode: shrink larger images so their long side is this
    max_pixels: int = DEFAULT_MAX_PIXELS
    full_decode: bool = False  # decode every image fully (slower; also catches corrupt JPEG scan data)
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def sample_key(index: int) -> str:
    """Keys are the input position: unique, stable across re-runs, and free of dots."""
    return f"{index:09d}"


def read_caption_file(path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SampleError(MISSING_TEXT, f"no caption file {Path(path).name}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SampleError(BAD_UTF8, str(e)) from None
    if not text.strip():
        raise SampleError(EMPTY_TEXT, "caption file is empty")
    return text.strip()


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise SampleError(MISSING_IMAGE, path) from None


def process(item: Job | Skip, options: BuildOptions) -> dict[str, Any] | Skip:
    """Turn a job into a WebDataset sample dict, or into a Skip with the reason it cannot be one."""
    if isinstance(item, Skip):
        return item
    try:
        meta = dict(item.meta)
        if item.caption_path is not None:
            meta["caption"] = read_caption_file(item.caption_path)
        sample: dict[str, Any] = {"__key__": sample_key(item.index)}
        if item.image_path is not None or len(item.image_data) == 1:
            encoded = _read_image(item.image_path) if item.image_path is not None else item.image_data[0]
            ext, data, width, height = _checked_image(encoded, options)
            sample[ext] = data
            meta.update(width=width, height=height)
        numbered = item.image_paths or (item.image_data if len(item.image_data) > 1 else ())
        if numbered:
            sizes = []
            for i, source in enumerate(numbered):
                ext, data, width, height = _checked_image(
                    _read_image(source) if isinstance(source, str) else source, options)
                sample[f"{i}.{ext}"] = data
                sizes.append({"width": width, "height": height})
            meta["image_sizes"] = sizes  # per image, in KEY.i order
        if item.video_path is not None:
            ext, data, info = _checked_video(item.video_path, options)
            sample[ext] = data
            meta["video"] = {"path": meta.get("video"), **info}
        if item.caption:
            sample["txt"] = meta["caption"]
        sample["json"] = _dumps(meta)
        return sample
    except SampleError as e:
        return Skip(item.index, item.input, e.reason, e.detail)


def _checked_image(data: bytes, options: BuildOptions) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of one image as it goes into the shard; SampleError if it is unusable."""
    ext, width, height = check_image(data, options.max_pixels, options.full_decode)
    if options.reencode:
        data = reencode(data, options.reencode, options.reencode_quality, options.max_side)
        ext = options.reencode
    return ext, data, width, height


def _checked_video(path: str, options: BuildOptions) -> tuple[str, bytes, dict[str, Any]]:
    """(container extension, original bytes, probe) of a clip; SampleError if it does not open, has no video
    stream or frames, or its frames pass the pixel cap. Never re-encoded."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in VIDEO_EXTENSIONS:
        raise SampleError(UNSUPPORTED_VIDEO, f"{Path(path).name}: not one of {', '.join(VIDEO_EXTENSIONS)}")
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise SampleError(MISSING_VIDEO, path) from None
    return ext, data, probe(data, options.max_pixels, options.full_decode).to_json()


def _dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def process_all(items: Iterable[Job | Skip], options: BuildOptions) -> Iterator[dict[str, Any] | Skip]:
    """Results in input order. With workers > 1 a process pool reads and checks images; at most two windows of
    work are in flight, so memory stays bounded however large the input (Pool.imap alone would buffer it all)."""
    fn = partial(process, options=options)
    if options.workers <= 1:
        yield from map(fn, items)
        return
    window = max(256, options.workers * 64)
    chunksize = max(1, min(32, window // (options.workers * 4)))
    # forkserver: workers start from a clean process, not a fork of one that has threads (the progress bar's, a
    # library's); preloading this module lets each worker fork from a server that already imported Pillow & co.
    if sys.platform == "win32":
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    with context.Pool(options.workers) as pool:
        pending: deque[Iterator[Any]] = deque()
        for batch in _batched(items, window):
            pending.append(pool.imap(fn, batch, chunksize))
            if len(pending) > 1:
                yield from pending.popleft()
        while pending:
            yield from pending.popleft()


def build_shards(
    items: Iterable[Job | Skip],
    out_dir: str | Path,
    options: BuildOptions,
    source: str,
    total: int | None = None,
) -> dict[str, Any]:
    """Write the shards and the manifest for a stream of jobs; returns the manifest."""
    out_dir = Path(out_dir)
    clear_shard_dir(out_dir, overwrite=options.overwrite)
    skipped: list[dict[str, str]] = []
    images: Counter[int] = Counter()  # written samples by their number of images
    kinds: Counter[str] = Counter()  # written samples by kind (image, images, video, interleaved, text)
    bar = tqdm(total=total, desc=f"shards {source}", unit="sample", disable=not options.progress, mininterval=0.5)
    with (
        bar,
        ShardWriter(
            out_dir, samples_per_shard=options.samples_per_shard, max_shard_bytes=options.max_shard_bytes
        ) as writer,
    ):
        for result in process_all(items, options):
            if isinstance(result, Skip):
                skipped.append(result.record())
            else:
                writer.write(result)
                images[sum(ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS for ext in result)] += 1
                kinds[sample_kind(result)] += 1
            bar.update()
            bar.set_postfix(skipped=len(skipped), refresh=False)
    extra = {"source": source, **options.extra, "images_per_sample": {str(k): n for k, n in sorted(images.items())},
             "samples_by_kind": dict(sorted(kinds.items()))}
    if options.reencode:
        extra["reencode"] = {
            "format": options.reencode,
            "quality": options.reencode_quality,
            "max_side": options.max_side,
        }
    return write_manifest(out_dir, writer.shards, skipped, extra=extra)
