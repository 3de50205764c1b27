"""Run under torchrun (2 ranks, gloo, a 2 s collective timeout): the shared-file-system agreements of
pretrain.train.shared_fs and distributed.rank0_work, each rank given its own view of the disk. Every rank writes
OUT/rank<R>.json with what it got; the test asserts on them.

argv: OUT ROOT0 ROOT1, where ROOTr is the checkpoint root rank r sees (rank 0's holds a committed checkpoint).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed

from pretrain import distributed
from pretrain.train import shared_fs

TIMEOUT_S = 2.0
SLOW_S = 2.5 * TIMEOUT_S


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def main(out: Path, roots: list[Path]) -> None:
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    root = roots[rank]
    report: dict = {}
    path, meta = shared_fs.agree_on_resume("auto", root, rank)
    report["resume"] = [str(path) if path else None, meta.get("step")]
    report["own_view"] = str(shared_fs.ckpt.find_resume(root))
    report["bad_path"] = _error(lambda: shared_fs.agree_on_resume(str(root / "nope"), root, rank))

    def slow() -> str:
        time.sleep(SLOW_S)
        return "converted"

    t0 = time.monotonic()
    report["slow"] = distributed.rank0_work(slow, rank, timeout_minutes=1.0)
    report["slow_waited_s"] = time.monotonic() - t0
    report["after_slow"] = distributed.all_reduce(torch.tensor([1.0 + rank])).item()  # the group is still healthy

    def fail() -> None:
        raise ValueError("disk on fire")

    report["failed"] = _error(lambda: distributed.rank0_work(fail, rank, timeout_minutes=1.0))
    same, other = out / "run", out / f"elsewhere{rank}"
    if rank == 0:
        same.mkdir(exist_ok=True)
    distributed.barrier()
    report["same_dir"] = _error(lambda: shared_fs.check_one_run_dir(same, rank, grace_s=0.5))
    report["other_dir"] = _error(lambda: shared_fs.check_one_run_dir(same if rank == 0 else other, rank,
                                                                     grace_s=0.5))
    # The control: the same wait in a collective does time out (last: it leaves the group broken).
    report["barrier_control"] = _error(lambda: (rank == 0 and time.sleep(SLOW_S), distributed.barrier()))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(sys.argv[2]), Path(sys.argv[3])])
