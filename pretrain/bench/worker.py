"""One process of a `pretrain bench train` run, under torchrun:

    python -m pretrain.bench.worker ours CONFIG --out DIR
    python -m pretrain.bench.worker peer CONFIG --out DIR --batch B --steps N

`ours` is our Trainer exactly as `pretrain train` runs it, except that it writes no checkpoint (a benchmark times
steps; the final save of a 7B ZeRO-3 run would cost minutes and ~100 GB of disk). Its metrics.jsonl is in the
config's run directory. `peer` is pretrain.bench.peer. Rank 0 writes DIR/result.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from pretrain.config import load_config


def _run_ours(cfg: Any, out: Path) -> dict[str, Any]:
    from pretrain.train.trainer import Trainer

    class BenchTrainer(Trainer):
        def save(self) -> None:  # no checkpoint: see the module docstring
            return None

    trainer = BenchTrainer(cfg)
    code = trainer.fit()
    if code != 0:
        raise RuntimeError(f"our trainer exited with {code}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"gpu_mem_gib": peak, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.worker")
    p.add_argument("role", choices=["ours", "peer"])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=1, help="peer: samples per micro-batch")
    p.add_argument("--steps", type=int, default=1, help="peer: optimizer steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    if not torch.cuda.is_available():
        # Our loader runs in-process loading on one thread (data.num_workers=0); give both trainers the same.
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pretrain import distributed, exit_codes

    try:
        if args.role == "ours":
            result = _run_ours(cfg, out)
        else:
            from pretrain.bench.peer import train_peer

            result = train_peer(cfg, out, args.batch, args.steps)
        (mem,) = distributed.all_reduce_values([result["gpu_mem_gib"] or 0.0], "max")
        result["gpu_mem_gib"] = mem if result["gpu_mem_gib"] is not None else None
        result["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        if int(os.environ.get("RANK", "0")) == 0:
            (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    except Exception as err:
        traceback.print_exc()
        print(f"error: bench {args.role} stopped: {err}", flush=True)
        distributed.finish(exit_codes.EXIT_ERROR, synchronize=False)
    distributed.finish(exit_codes.EXIT_OK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
