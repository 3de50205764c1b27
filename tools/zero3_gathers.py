"""Bytes all-gathered per optimizer step of our training loop, and which parameters ZeRO-3 gathered.

Every all-gather torch.distributed runs (`all_gather_into_tensor`, `all_gather`, `_all_gather_base`: what
DeepSpeed's ZeRO-3 parameter fetch, its persistent-parameter refresh and our alignment objectives issue) is wrapped
before DeepSpeed starts, so its output bytes are counted per optimizer step (the trainer's step counter at that
moment), and ZeRO-3's parameter coordinator is wrapped to name the parameters each fetch gathered. Counting starts
after the set-up (the build, the engine, the frozen replicas), so only what the steps gather is reported.

    torchrun --nproc_per_node 2 tools/zero3_gathers.py CONFIG --out FILE.json [key=value ...]
    (a bench recipe: `python tools/zero3_gathers.py CONFIG --bench-inputs DIR --prepare --out F` first, then
    torchrun ... --bench-inputs DIR)

Rank 0 writes {"per_step": {step: {"bytes": n, "calls": n}}, "params": {name: times gathered}, "losses": [...]}.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_GATHERS = ("all_gather_into_tensor", "all_gather", "_all_gather_base")


class GatherCounter:
    """Counts all-gathered bytes per step and gathered parameters by ZeRO id while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.step_of: Callable[[], int] = lambda: 0
        self.per_step: dict[int, Counter] = defaultdict(Counter)
        self.by_id: Counter = Counter()

    def _count(self, output: Any) -> None:
        tensors = output if isinstance(output, list | tuple) else [output]
        step = self.per_step[self.step_of()]
        step["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        step["calls"] += 1

    def install(self) -> None:
        """Wrap torch.distributed's gathers and ZeRO-3's fetch; before DeepSpeed starts (it keeps a reference)."""
        import torch.distributed as tdist
        from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

        for name in _GATHERS:
            original = getattr(tdist, name)

            @functools.wraps(original)
            def wrapped(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                if self.active:  # the output: first argument, or output_tensor= / tensor_list=
                    self._count(args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list")))
                return _original(*args, **kwargs)

            setattr(tdist, name, wrapped)
        fetch_name = "_PartitionedParameterCoordinator__all_gather_params"
        fetch = getattr(ppc.PartitionedParameterCoordinator, fetch_name)

        @functools.wraps(fetch)
        def counted_fetch(coordinator: Any, params: Any, forward: bool) -> Any:
            if self.active:
                self.by_id.update(p.ds_id for p in params)
            return fetch(coordinator, params, forward)

        setattr(ppc.PartitionedParameterCoordinator, fetch_name, counted_fetch)

    def report(self, module: torch.nn.Module) -> dict[str, Any]:
        names = {p.ds_id: n for n, p in module.named_parameters() if hasattr(p, "ds_id")}
        return {"per_step": {str(k): dict(v) for k, v in sorted(self.per_step.items())},
                "params": {names.get(i, str(i)): n for i, n in sorted(self.by_id.items())}}


def count_ours(cfg: Any, save: bool = False) -> dict[str, Any]:
    """Our Trainer's loop (as `pretrain train`; checkpoints only with `save`) with the gathers counted from its
    first step (a checkpoint's own gathers count into its step)."""
    from pretrain.train.trainer import Trainer

    counter = GatherCounter()
    counter.install()

    class NoSaveTrainer(Trainer):
        def save(self) -> None:
            return None

    trainer = (Trainer if save else NoSaveTrainer)(cfg)
    counter.step_of = lambda: trainer.step
    counter.active = True
    code = trainer.fit()
    counter.active = False
    if code != 0:
        raise RuntimeError(f"our trainer exited with {code}")
    report = counter.report(trainer.engine.module)
    metrics = Path(cfg.run.output_dir) / "metrics.jsonl"
    if metrics.exists():
        report["losses"] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/zero3_gathers.py")
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--bench-inputs", metavar="DIR",
                   help="a bench recipe: its tokenizer (here) and shards made locally; run once alone first")
    p.add_argument("--prepare", action="store_true", help="with --bench-inputs: make the inputs and stop")
    p.add_argument("--save", action="store_true", help="write checkpoints as the config says")
    p.add_argument("overrides", nargs="*", help="key=value")
    args = p.parse_intermixed_args(argv)
    import os
    import traceback

    from pretrain import distributed
    from pretrain.config import load_config
    from pretrain.exit_codes import EXIT_ERROR, EXIT_OK

    cfg = load_config(args.config, args.overrides)
    if args.bench_inputs:
        from pretrain.bench.inputs import with_local_inputs

        cfg, _ = with_local_inputs(cfg, args.bench_inputs, samples_per_shard=16, sizes=((640, 480),))
        if args.prepare:
            return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = count_ours(cfg, args.save)
        if int(os.environ.get("RANK", "0")) == 0:
            out.write_text(json.dumps(report, indent=1) + "\n")
    except Exception as err:
        traceback.print_exc()
        print(f"error: gather count stopped: {err}", flush=True)
        distributed.finish(EXIT_ERROR, synchronize=False)
    distributed.finish(EXIT_OK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
