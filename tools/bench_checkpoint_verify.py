"""What `checkpoint.verify: crc` costs against `sizes`, at a checkpoint of a given parameter count.

Writes files the size of a ZeRO-3 bf16 + Adam checkpoint (per rank: fp32 master weights and the two Adam moments,
12 bytes per parameter over all ranks, plus a small model-states file and the trainer state), random bytes, synced
to disk as a save does; then times over them: the sizes check (`problem(verify="sizes")`), the CRC-32 check the
resume runs (`problem(verify="crc")`: zlib.crc32 on a few threads), zlib.crc32 on one thread, xxhash's xxh3_64 on one
thread (when installed), and a plain read (the I/O alone). Each hash is also timed on a buffer in memory (its CPU
cost per GB, no I/O).

    python tools/bench_checkpoint_verify.py --params 1e9 --ranks 8 --dir /tmp/ckpt_bench [--record RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from pretrain.train import checkpoint as ckpt

BLOCK = 64 << 20


def write_checkpoint(out: Path, params: float, ranks: int) -> float:
    """The checkpoint's files, as a committed checkpoint lists them; returns the seconds the write + fsync took."""
    out.mkdir(parents=True, exist_ok=True)
    block = os.urandom(BLOCK)
    sizes = {f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt": int(params * 12 / ranks) for r in range(ranks)}
    sizes |= {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt": 200_000 for r in range(ranks)}
    sizes |= {f"trainer_rank{r:05d}.pt": 50_000 for r in range(ranks)}
    t0 = time.perf_counter()
    for name, size in sizes.items():
        with open(out / name, "wb") as f:
            left = size
            while left:
                n = min(left, BLOCK)
                f.write(block[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    ckpt.commit(out.parent, out.name, {"step": 0}, [sizes], ckpt.checksums(out, sizes))
    return seconds


def _read_all(out: Path, fn: Callable[[memoryview, int], int] | None) -> None:
    buf = bytearray(ckpt.CRC_CHUNK)
    view = memoryview(buf)
    for path in sorted(out.iterdir()):
        state = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if fn is not None:
                    state = fn(view[:n], state)


def _xxh3() -> Callable[[memoryview, int], int] | None:
    try:
        import xxhash
    except ImportError:
        return None
    h = xxhash.xxh3_64()

    def update(data: memoryview, state: int) -> int:
        h.update(data)
        return state

    return update


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def in_memory_gbps(fn: Callable[[memoryview, int], int], gib: int = 2) -> float:
    data = memoryview(os.urandom(BLOCK))
    t0 = time.perf_counter()
    for _ in range(gib * (1 << 30) // BLOCK):
        fn(data, 0)
    return gib * (1 << 30) / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench_checkpoint_verify.py")
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--dir", required=True, help="where the checkpoint's files go (removed afterwards)")
    p.add_argument("--record", help="append the results to this markdown file")
    args = p.parse_args(argv)
    out = Path(args.dir) / "checkpoints" / ckpt.tag_for(1)
    write_s = write_checkpoint(out, args.params, args.ranks)
    total = sum(p.stat().st_size for p in out.iterdir())
    rows = [("write + fsync (the save's own I/O)", write_s)]
    rows.append(("verify=sizes (stat every listed file)", timed(lambda: ckpt.problem(out, "sizes"))))
    rows.append(("verify=crc (zlib.crc32, threads)", timed(lambda: ckpt.problem(out, "crc"))))
    rows.append(("read only, 1 thread", timed(lambda: _read_all(out, None))))
    rows.append(("zlib.crc32, 1 thread", timed(lambda: _read_all(out, lambda d, s: zlib.crc32(d, s)))))
    xxh = _xxh3()
    if xxh is not None:
        rows.append(("xxhash xxh3_64, 1 thread", timed(lambda: _read_all(out, xxh))))
    assert ckpt.problem(out, "crc") is None
    memory = {"zlib.crc32": in_memory_gbps(lambda d, s: zlib.crc32(d, s))}
    if xxh is not None:
        memory["xxhash xxh3_64"] = in_memory_gbps(xxh)
    for path in out.iterdir():
        path.unlink()
    text = report(args, total, rows, memory)
    print(text)
    if args.record:
        with open(args.record, "a") as f:
            f.write("\n" + text)
    return 0


def report(args: argparse.Namespace, total: int, rows: list[tuple[str, float]], memory: dict[str, float]) -> str:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"### checkpoint.verify cost: {args.params:.3g} parameters, {args.ranks} rank files, "
             f"{total / 1e9:.1f} GB ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"python {platform.python_version()}, zlib {zlib.ZLIB_RUNTIME_VERSION}",
             f"- commit: {commit}", f"- command: `python {' '.join(sys.argv)}`", "",
             "| what | seconds | GB/s |", "|---|---|---|"]
    lines += [f"| {what} | {s:.2f} | {total / s / 1e9:.2f} |" for what, s in rows]
    lines += ["", "| hash in memory (no I/O) | GB/s |", "|---|---|"]
    lines += [f"| {name} | {gbps:.2f} |" for name, gbps in memory.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
