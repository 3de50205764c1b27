"""Shard building from the common sources: images per CPU-second against webdataset's ShardWriter fed the same
records, and peak RSS building from a 100k-record LLaVA JSON and a 2 GB Parquet file.

    .venv/bin/python tools/bench_shard_sources.py make WORK_DIR        # inputs (about 2.3 GB), once
    .venv/bin/python tools/bench_shard_sources.py throughput WORK_DIR [--rounds 3]
    .venv/bin/python tools/bench_shard_sources.py rss WORK_DIR [--workers 1 2]
    rm -rf WORK_DIR

`throughput` runs both writers in this process over the same 1000 photo-like JPEGs (480p-720p, pretrain.bench's
bench images), read from a LLaVA JSON + image folder and from a Parquet file with the images inside, and counts CPU
time (user + system, not wall: the machine may be shared); ours checks every image (format, size, end of data) as
`pretrain shards` always does, the ShardWriter baseline writes the bytes unchecked. `rss` runs `pretrain shards llava`
and `pretrain shards parquet` under `/usr/bin/time -v` (peak RSS of the largest process, CPU of the whole run).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pretrain.bench.inputs import PHOTO_SIZES, bench_sample, caption
from pretrain.shards.build import BuildOptions, build_shards
from pretrain.shards.hub_tables import read_hub_tables
from pretrain.shards.sources import read_llava
from pretrain.shards.synthetic import photo_like

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 1000
LLAVA_RECORDS = 100_000
BIG_PARQUET_BYTES = 2 * 10**9
ROW_GROUP_ROWS = 100  # what `datasets` writes for image tables


def _turns(text: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\nDescribe the picture briefly."}, {"from": "gpt", "value": text}]


def make(work: Path) -> None:
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    records, rows = [], {"image": [], "conversations": [], "id": []}
    for i in range(PHOTOS):
        sample = bench_sample(i, PHOTO_SIZES)
        (photos / f"{i:05d}.jpg").write_bytes(sample["jpg"])
        records.append({"id": str(i), "image": f"{i:05d}.jpg", "conversations": _turns(sample["txt"])})
        rows["image"].append({"bytes": sample["jpg"], "path": None})
        rows["conversations"].append(_turns(sample["txt"]))
        rows["id"].append(str(i))
    (work / "photos.json").write_text(json.dumps(records))
    pq.write_table(pa.table(rows), work / "photos.parquet", row_group_size=ROW_GROUP_ROWS, use_dictionary=False)
    _make_big_parquet(work, rows)
    _make_llava_100k(work)


def _make_big_parquet(work: Path, rows: dict[str, list]) -> None:
    """The 1000 photos over and over (no dictionary encoding, so the file really holds every copy) to 2 GB."""
    table = pa.table(rows)
    with pq.ParquetWriter(work / "big.parquet", table.schema, use_dictionary=False) as writer:
        for _ in range(-(-BIG_PARQUET_BYTES // table.nbytes)):
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)


def _make_llava_100k(work: Path) -> None:
    """LLaVA-Pretrain-like: 100k records over a pool of 100 small images (the JSON is what this measures)."""
    pool = work / "pool"
    pool.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(100):
        buf = io.BytesIO()
        photo_like(96, 64, rng).save(buf, "JPEG", quality=90)
        (pool / f"{i:03d}.jpg").write_bytes(buf.getvalue())
    records = [{"id": f"{i:06d}", "image": f"{i % 100:03d}.jpg", "conversations": _turns(caption(rng))}
               for i in range(LLAVA_RECORDS)]
    (work / "llava100k.json").write_text(json.dumps(records))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ours(read: Callable[[], tuple], out: Path) -> int:
    items, total = read()
    manifest = build_shards(items, out, BuildOptions(progress=False, overwrite=True), "bench", total)
    return manifest["num_samples"]


def _shardwriter_llava(work: Path, out: Path) -> int:
    records = json.loads((work / "photos.json").read_text())
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, record in enumerate(records):
            data = (work / "photos" / record["image"]).read_bytes()
            sink.write({"__key__": f"{i:09d}", "jpg": data, "json": json.dumps(record).encode()})
    return len(records)


def _shardwriter_parquet(work: Path, out: Path) -> int:
    n = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for batch in pq.ParquetFile(work / "photos.parquet").iter_batches(batch_size=64):
            for row in batch.to_pylist():
                meta = {"conversations": row["conversations"], "id": row["id"]}
                sink.write({"__key__": f"{n:09d}", "jpg": row["image"]["bytes"], "json": json.dumps(meta).encode()})
                n += 1
    return n


def throughput(work: Path, rounds: int) -> None:
    runs = {
        "ours: shards llava (JSON + image folder)": lambda out: _ours(
            lambda: read_llava(work / "photos.json", work / "photos"), out),
        "webdataset ShardWriter, same records (JSON + folder)": lambda out: _shardwriter_llava(work, out),
        "ours: shards parquet (images inside)": lambda out: _ours(
            lambda: read_hub_tables(work / "photos.parquet"), out),
        "webdataset ShardWriter, same rows (pyarrow)": lambda out: _shardwriter_parquet(work, out),
    }
    best: dict[str, float] = {}
    for _ in range(rounds):  # interleaved, the least CPU of each kept
        for name, run in runs.items():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            start = _cpu()
            assert run(out) == PHOTOS
            best[name] = min(best.get(name, float("inf")), _cpu() - start)
    shutil.rmtree(work / "out", ignore_errors=True)
    print("| writer | CPU s | images per CPU-s |\n| --- | --- | --- |")
    for name, cpu in best.items():
        print(f"| {name} | {cpu:.2f} | {PHOTOS / cpu:.0f} |")


def _timed(command: list[str]) -> tuple[float, float]:
    """(peak RSS GiB, CPU s) of a whole command run under GNU time."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", result.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", result.stderr).group(1))
    return rss_kb / 2**20, user + system


def rss(work: Path, workers: list[int]) -> None:
    pretrain = str(Path(sys.executable).with_name("pretrain"))
    llava_mb = (work / "llava100k.json").stat().st_size / 1e6
    parquet_gb = (work / "big.parquet").stat().st_size / 1e9
    inputs = {
        f"LLaVA JSON, 100k records ({llava_mb:.0f} MB)": [
            "llava", "--json", str(work / "llava100k.json"), "--image-root", str(work / "pool")],
        f"Parquet, {parquet_gb:.2f} GB": ["parquet", "--file", str(work / "big.parquet")],
    }
    print("| input | workers | peak RSS (largest process) | CPU s |\n| --- | --- | --- | --- |")
    for name, args in inputs.items():
        for n in workers:
            out = work / "rss_out"
            peak, cpu = _timed([pretrain, "shards", *args, "--out", str(out), "--workers", str(n), "--no-progress",
                                "--overwrite"])
            shutil.rmtree(out)
            print(f"| {name} | {n} | {peak:.2f} GiB | {cpu:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["make", "throughput", "rss"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if args.what == "make":
        make(args.work)
    elif args.what == "throughput":
        throughput(args.work, args.rounds)
    else:
        rss(args.work, args.workers)


if __name__ == "__main__":
    main()
