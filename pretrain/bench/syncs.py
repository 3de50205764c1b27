"""Host synchronisations per optimizer step, counted on any machine (a CPU one too), and who made them.

A synchronisation is an op that makes the host wait for the device: reading a value (`.item()`, `bool(t)`,
`int(t)`: aten._local_scalar_dense), an op whose output size depends on the data (nonzero, masked_select, unique,
repeat_interleave without an output size, boolean-mask indexing), a comparison returning a Python bool (equal), or
a copy to the host. On a CPU-only machine every tensor is a host tensor, so copies are counted when a caller asks
for the host explicitly (`.to("cpu", copy=True)`, what the communication layer's `to_host` does); host-side counts
computed with numpy or Python numbers cost nothing and are not counted.

Each counted op is attributed to the innermost frame outside torch: DeepSpeed, transformers, the model
(pretrain/model), the step (pretrain/train) or elsewhere, with its file:line, and to the optimizer step that was
running (the trainer's step counter at that moment).

    python -m pretrain.bench.syncs ours CONFIG --out FILE.json [--steps N]
    python -m pretrain.bench.syncs peer CONFIG --out FILE.json [--steps N --batch B]

`ours` runs our Trainer (no checkpoint) and `peer` transformers' Trainer (pretrain.bench.peer), alone or under
torchrun; rank 0 writes {"per_step": {step: {bucket: n}}, "where": {bucket: {file:line: n}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = str(Path(__file__).resolve().parents[2])
_TORCH = str(Path(torch.__file__).resolve().parent)
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique_dim", "_unique", "_unique2", "unique_consecutive",
                   "unique_dim_consecutive", "equal", "_local_scalar_dense"}


def is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an aten op makes the host wait for the device (see the module docstring)."""
    name = func._schema.name.split("::")[-1]
    if name in _DATA_DEPENDENT:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) and len(args) < 3
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name == "_to_copy":
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu"
    if name == "copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    return False


def bucket_of(filename: str) -> str:
    if "/deepspeed/" in filename:
        return "deepspeed"
    if "/transformers/" in filename:
        return "transformers"
    if filename.startswith(os.path.join(_ROOT, "pretrain", "model")):
        return "model"
    if filename.startswith(os.path.join(_ROOT, "pretrain", "train")):
        return "step"
    return "other"


def _site(frame: Any) -> tuple[str, str]:
    """(bucket, file:line) of the innermost frame that is not torch's or this module's. A read inside the
    communication layer (pretrain/distributed.py) keeps that site but counts in its caller's bucket."""
    here, layer = os.path.abspath(__file__), os.path.join(_ROOT, "pretrain", "distributed.py")
    site = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH) and os.path.abspath(name) != here and "/torch/" not in name:
            short = os.path.relpath(name, _ROOT) if name.startswith(_ROOT) else name.split("site-packages/")[-1]
            site = site or f"{short}:{frame.f_lineno}"
            if os.path.abspath(name) != layer:
                return bucket_of(name), site
        frame = frame.f_back
    return "other", site or "?"


class SyncCounter(TorchDispatchMode):
    """Counts synchronising ops while active, per (step, bucket) and per (bucket, file:line)."""

    def __init__(self, step_of: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.step_of = step_of
        self.per_step: dict[int, Counter] = defaultdict(Counter)
        self.where: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs):
            bucket, site = _site(sys._getframe(1))
            self.per_step[self.step_of()][bucket] += 1
            self.where[bucket][f"{site} {func._schema.name.split('::')[-1]}"] += 1
        return func(*args, **kwargs)

    def report(self) -> dict[str, Any]:
        return {"per_step": {str(k): dict(v) for k, v in sorted(self.per_step.items())},
                "where": {b: dict(c.most_common()) for b, c in self.where.items()}}


def count_ours(cfg: Any) -> dict[str, Any]:
    """Our Trainer's loop (as `pretrain train`, without checkpoints) under a SyncCounter; step k's count is what
    ran while the trainer's step counter read k."""
    from pretrain.train.trainer import Trainer

    class NoSaveTrainer(Trainer):
        def save(self) -> None:
            return None

    trainer = NoSaveTrainer(cfg)
    counter = SyncCounter(lambda: trainer.step)
    with counter:
        code = trainer.fit()
    if code != 0:
        raise RuntimeError(f"our trainer exited with {code}")
    return counter.report()


def count_peer(cfg: Any, out: Path, batch: int, steps: int) -> dict[str, Any]:
    """transformers' Trainer (pretrain.bench.peer) under a SyncCounter from its first step on."""
    from transformers import TrainerCallback

    from pretrain.bench.peer import train_peer

    counter = SyncCounter()

    class Count(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            counter.step_of = lambda: state.global_step
            counter.__enter__()

        def on_train_end(self, *_: Any, **__: Any) -> None:
            counter.__exit__(None, None, None)

    train_peer(cfg, out.parent / "peer_run", batch, steps, callbacks=[Count()])
    return counter.report()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.syncs")
    p.add_argument("role", choices=["ours", "peer"])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: train.max_steps)")
    p.add_argument("--batch", type=int, default=None, help="peer: samples per micro-batch (default: ours)")
    args = p.parse_args(argv)
    from pretrain import distributed, exit_codes
    from pretrain.config import load_config

    cfg = load_config(args.config, [f"train.max_steps={args.steps}"] if args.steps else [])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.role == "ours":
            report = count_ours(cfg)
        else:
            report = count_peer(cfg, out, args.batch or cfg.train.micro_batch_size, cfg.train.max_steps)
        if int(os.environ.get("RANK", "0")) == 0:
            out.write_text(json.dumps(report, indent=1) + "\n")
    except Exception as err:
        traceback.print_exc()
        print(f"error: sync count stopped: {err}", flush=True)
        distributed.finish(exit_codes.EXIT_ERROR, synchronize=False)
    distributed.finish(exit_codes.EXIT_OK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
