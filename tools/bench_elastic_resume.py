"""Resume start-up time of the loader: the same layout vs another world size, at 0%, 1% and 90% of a large epoch.

Writes a synthetic epoch (default 100 shards x 1000 samples, one 16x16 PNG + caption each), builds the loader state
a 4-rank run would save at a given fraction of the epoch (every slot that far into its share, a full shuffle buffer
of references), then times, for rank 0 of the new layout: building the loader from that state (for another layout
this is where the rest of the epoch is computed and split) and the first batch (restoring the buffer, decoding).

    python tools/bench_elastic_resume.py --out runs/elastic-bench [--shards 100 --per-shard 1000 --no-manifest]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_epoch(out: Path, shards: int, per_shard: int) -> list[str]:
    from pretrain.shards.writer import ShardWriter

    if (out / "DONE").is_file():
        return [str(p) for p in sorted(out.glob("shard-*.tar"))]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    with ShardWriter(out, samples_per_shard=per_shard) as w:
        for i in range(shards * per_shard):
            w.write({"__key__": f"s{i:08d}", "png": png, "json": json.dumps({"caption": f"item {i}"})})
    (out / "DONE").write_text("ok\n")
    return [str(p) for p in sorted(out.glob("shard-*.tar"))]


def set_manifest(urls: list[str], per_shard: int, present: bool) -> None:
    """The shard directory's manifest.json (sample counts a resume reads instead of tar headers), or none."""
    from pretrain.shards.writer import write_manifest

    out = Path(urls[0]).parent
    (out / "manifest.json").unlink(missing_ok=True)
    if present:
        write_manifest(out, [{"url": Path(u).name, "samples": per_shard, "bytes": Path(u).stat().st_size}
                             for u in urls])


def processor(root: Path):
    from transformers import AutoImageProcessor

    from pretrain.data.image import ImageTransform
    from pretrain.data.sample import SampleProcessor
    from pretrain.data.text import TextProcessor
    from pretrain.demo import tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer, write_tiny_vision

    tok = build_tokenizer(tokenizer_corpus(), vocab_size=400)
    vision = root / "clip" if (root / "clip").is_dir() else write_tiny_vision(root / "clip", "clip")
    text = TextProcessor(tok, tok.convert_tokens_to_ids("<image>"), image_tokens=16, max_length=64)
    return SampleProcessor(text, ImageTransform.from_processor(AutoImageProcessor.from_pretrained(vision)),
                           max_image_pixels=10**7)


def saved_state(urls: list[str], per_shard: int, world: int, fraction: float, buffer: int) -> dict[int, dict]:
    """The loader states of `world` ranks (0 workers) by rank, each slot `fraction` into its epoch share."""
    from pretrain.data.loader import LoaderSpec, layout
    from pretrain.data.slot_state import SlotState, StreamState
    from pretrain.data.stream import ShardReader, SourceStream

    spec = LoaderSpec(sources=[urls], weights=[1.0], world_size=world, shuffle_buffer=buffer, max_length=64)
    states = {}
    for s in range(world):
        shards, _ = SourceStream(urls, s, world, 0, 0, True, ShardReader()).shards_for(0)
        done = int(fraction * len(shards) * per_shard)
        pos, sample = divmod(done, per_shard)
        previous = [(0, shards[max(pos - 1, 0)], i) for i in range(min(buffer, per_shard))] if done else []
        slot = SlotState(streams=[StreamState(0, pos, sample)], buffer=previous,
                         buffer_epochs=[0] * len(previous), ok=[done])
        states[s] = {**layout(spec), "consumed": 0, "slots": {str(s): slot.to_dict()}}
    return states


def time_resume(proc, urls: list[str], states: dict[int, dict], world: int, buffer: int) -> tuple[float, float]:
    from pretrain.data.loader import LoaderSpec, ResumableLoader

    spec = LoaderSpec(sources=[urls], weights=[1.0], rank=0, world_size=world, shuffle_buffer=buffer,
                      rows_per_batch=1, max_length=64)
    t0 = time.perf_counter()
    loader = ResumableLoader(spec, proc, {r: json.loads(json.dumps(s)) for r, s in states.items()})
    t1 = time.perf_counter()
    next(iter(loader))
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--buffer", type=int, default=1000)
    ap.add_argument("--no-manifest", action="store_true", help="count samples from tar headers instead")
    args = ap.parse_args()
    t0 = time.perf_counter()
    urls = write_epoch(args.out / "shards", args.shards, args.per_shard)
    set_manifest(urls, args.per_shard, not args.no_manifest)
    print(f"epoch: {len(urls)} shards x {args.per_shard} samples ({time.perf_counter() - t0:.1f} s to write)")
    proc = processor(args.out)
    print("| position | resumed on | load state (s) | first batch (s) | total (s) |")
    print("| --- | --- | --- | --- | --- |")
    for fraction in (0.0, 0.01, 0.9):
        states = saved_state(urls, args.per_shard, 4, fraction, args.buffer)
        for world, what in ((4, "4 ranks (same)"), (3, "3 ranks (changed)"), (1, "1 rank (changed)")):
            load, first = time_resume(proc, urls, states, world, args.buffer)
            print(f"| {fraction:.0%} | {what} | {load:.2f} | {first:.2f} | {load + first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
