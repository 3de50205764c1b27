"""DeepSpeed's own consolidation of a ZeRO checkpoint's shards, for comparing what a resume loaded with what was
saved: the fp32 weights as `deepspeed.utils.zero_to_fp32` merges them, and the Adam moments of the optimizer-state
files merged by the same code (their flat partitions have the layout of the fp32 ones)."""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (
    BASE_OPTIMIZER_STATE,
    FP32_FLAT_GROUPS,
    OPTIMIZER_STATE_DICT,
    PARAM_ALIGNMENT_PADDINGS,
    SINGLE_PARTITION_OF_FP32_GROUPS,
)
from deepspeed.utils import zero_to_fp32 as z

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _moments(optim: dict, stage: int, key: str, fp32: list[torch.Tensor]) -> list[torch.Tensor]:
    """One rank's flat partitions of an Adam moment, cut to its fp32 partitions (ZeRO-1/2 keep alignment padding)."""
    base = optim[BASE_OPTIMIZER_STATE] if stage <= 2 else optim[OPTIMIZER_STATE_DICT]
    state = base["state"] if isinstance(base, dict) else dict(enumerate(base))
    return [state[i][key].flatten()[: part.numel()] for i, part in enumerate(fp32)]


def consolidate(ckpt_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"fp32" | "exp_avg" | "exp_avg_sq": {parameter name: full tensor}} over the trainable parameters."""
    model_states = z.parse_model_states(z.get_model_state_files(str(ckpt_dir)))
    optims = [torch.load(f, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
              for f in z.get_optim_files(str(ckpt_dir))]
    stage = int(optims[0]["zero_stage"])
    world = optims[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    fp32 = [o[SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else FP32_FLAT_GROUPS] for o in optims]
    out = {}
    for key in STATES:
        flats = fp32 if key == "fp32" else [_moments(o, stage, key, f) for o, f in zip(optims, fp32, strict=True)]
        if stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flats, model_states, True,
                                                                 optims[0].get(PARAM_ALIGNMENT_PADDINGS))
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, True)
        params = set().union(*model_states[0].param_shapes)  # one name -> shape mapping per param group
        out[key] = {k: v for k, v in z.to_torch_tensor(merged).items() if k in params}
    return out
