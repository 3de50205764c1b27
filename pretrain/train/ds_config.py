"""The DeepSpeed config: generated from ours, optionally on top of a user's DeepSpeed JSON (LLaVA's zero3.json).

Precedence: the user's file is the base; our batch sizes, precision, clipping and ZeRO stage always win (they are
what our config validated); then `deepspeed.overrides` (dotted keys) win over everything. "auto" values in a user
file are resolved from ours, as HF Trainer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config, ConfigError


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


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    base: dict[str, Any] = {}
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file: {path} not found")
        try:
            base = _drop_auto(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON: {err}") from None
        # Optimizer and scheduler are ours (param groups, multipliers, exact resume); theirs would conflict.
        base.pop("optimizer", None)
        base.pop("scheduler", None)
    t = cfg.train
    zero = dict(base.get("zero_optimization", {}))
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
    out = {
        **base,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        # Our client optimizer is torch AdamW; DeepSpeed's CPU Adam would need a 2-minute C++ build per machine.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        out["zero_force_ds_cpu_optimizer"] = True
    for dotted, value in ds.overrides.items():
        _set_dotted(out, dotted, value)
    return out
