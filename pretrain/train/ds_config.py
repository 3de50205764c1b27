"""The DeepSpeed config: generated from ours, optionally on top of a user's DeepSpeed JSON (LLaVA's zero3.json).

Precedence, lowest first:
1. cosmetic defaults of ours (`steps_per_print`, `wall_clock_breakdown`);
2. the user's file (`deepspeed.config_file`), its "auto" values removed. Its `optimizer` and `scheduler` are dropped
   with a warning: ours carry the parameter groups, lr multipliers and exact resume;
3. what our config validated, always: batch sizes (micro x accumulation x world), gradient clipping, precision
   (bf16 / fp16 off), the ZeRO stage, offload when ours asks for it, and the client-optimizer flags;
4. ZeRO tuning knobs (overlap_comm, bucket and prefetch sizes, persistence threshold, live parameters) from ours only
   where the file does not set them: an "auto" there resolves to our value, as the HF Trainer resolves its autos;
5. `deepspeed.overrides` (dotted keys, e.g. `zero_optimization.sub_group_size`) over everything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config, ConfigError

log = logging.getLogger(__name__)


def _offload(kind: str, nvme_path: str | None) -> dict[str, Any] | None:
    if kind == "none":
        return None
    out: dict[str, Any] = {"device": kind, "pin_memory": torch.cuda.is_available()}
    if kind == "nvme":
        out["nvme_path"] = nvme_path
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _drop_auto(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _drop_auto(v) for k, v in tree.items() if v != "auto"}
    return tree


def read_user_config(path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON with "auto" values, `optimizer` and `scheduler` removed."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config_file: {file} not found")
    try:
        tree = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file: {file} is not valid JSON: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"deepspeed.config_file: {file} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if tree.pop(key, None) is not None:
            log.warning("deepspeed.config_file: its %r section is ignored: the trainer's own (train.lr, "
                        "train.schedule, ...) is used", key)
    return _drop_auto(tree)


def build_ds_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for `world_size` ranks; `load_universal` to load a universal checkpoint."""
    ds = cfg.deepspeed
    base = read_user_config(ds.config_file) if ds.config_file else {}
    t = cfg.train
    zero = dict(base.get("zero_optimization", {}))
    if zero.get("stage", ds.zero_stage) != ds.zero_stage:
        log.warning("deepspeed.config_file sets ZeRO stage %s; deepspeed.zero_stage=%d is used", zero["stage"],
                    ds.zero_stage)
    zero["stage"] = ds.zero_stage
    zero.setdefault("overlap_comm", ds.overlap_comm)
    zero.setdefault("contiguous_gradients", True)
    zero.setdefault("reduce_bucket_size", ds.reduce_bucket_size)
    if ds.zero_stage == 3:
        zero.setdefault("stage3_prefetch_bucket_size", ds.prefetch_bucket_size)
        zero.setdefault("stage3_param_persistence_threshold", ds.param_persistence_threshold)
        zero.setdefault("stage3_max_live_parameters", ds.max_live_parameters)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    for key, kind in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_params)):
        off = _offload(kind, ds.nvme_path)
        if off:
            zero[key] = off
    out = {"steps_per_print": 10**9, "wall_clock_breakdown": False, **base}
    out.update({
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # Micro-batch x accumulation x data-parallel size: the ranks of a sequence-parallel group share rows.
        "train_batch_size": t.micro_batch_size * t.grad_accum * ds.data_parallel_size(world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a step skipped for a non-finite loss relies on it (see step.py).
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        # The client optimizer is ours: torch AdamW, or DeepSpeedCPUAdam when the optimizer is offloaded (engine.py).
        "zero_force_ds_cpu_optimizer": False,
    })
    if ds.sequence_parallel_size > 1:  # zero.Init reads it (it has no mpu) to find the data-parallel size
        out["sequence_parallel_size"] = ds.sequence_parallel_size
        if ds.zero_stage == 3:  # one gradient divisor for every bucket (pretrain.model.sequence_parallel)
            zero["reduce_scatter"] = True
    if load_universal:
        out["checkpoint"] = {**out.get("checkpoint", {}), "load_universal": True}
    for dotted, value in ds.overrides.items():
        _set_dotted(out, dotted, value)
    return out


def optimizer_offloaded(ds_config: dict[str, Any]) -> bool:
    """Whether ZeRO keeps the optimizer state on CPU / NVMe (then the optimizer must be DeepSpeed's CPU Adam)."""
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device") in ("cpu", "nvme")
