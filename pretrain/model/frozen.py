"""Frozen parts under ZeRO-3: not gathered again at every call.

ZeRO-3 partitions every parameter and gathers a module's parameters at each call (forward, backward, the recompute
of activation checkpointing), frozen or not. A frozen module has no gradient and no optimizer state, so partitioning
it saves only its 16-bit weights, and costs a gather at every micro-batch. Per stage:

- vision tower, frozen in `align` and `finetune`: a replica in the compute dtype is kept whole on every rank,
  outside ZeRO-3's partitioning, and the forward runs it in place of the partitioned tower, which is never called
  (so never gathered) and stays in the module for checkpoints and the export. Its cost: the tower's weights once
  per rank (SigLIP-so400m: ~0.86 GB in bf16), against ~0.86 GB gathered at every micro-batch.
- decoder, frozen in `align`: its parameters are marked persistent (ds_persist): gathered on first use in a step
  and held until the step ends, so the forward, the backward (to the projector) and the recompute of every
  micro-batch share one gather per optimizer step. Not a replica: a 7B decoder whole on every rank costs 14 GB for
  the whole run; held for a step it costs the same at the peak but only while training.
- `full`: nothing is frozen; everything stays partitioned.

Every rank does the same, so ZeRO-3's lockstep holds (the partitioned tower is never called on any rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from accelerate import init_empty_weights
from torch import nn

from pretrain.model.flops import trainable_components

# What a stage keeps off ZeRO-3's per-call gathers (see the module docstring) follows from what it trains: a frozen
# tower runs as a replica, a frozen decoder is gathered once per step.


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def persist_frozen_decoder(vlm: nn.Module, stage: str) -> int:
    """Mark the frozen decoder's parameters persistent (before the engine starts); returns how many."""
    if "llm" in trainable_components(stage):
        return 0
    params = [p for p in list(vlm.model.language_model.parameters()) + list(vlm.lm_head.parameters())
              if hasattr(p, "ds_id") and not p.requires_grad]
    for p in params:
        p.ds_persist = True
    return len(params)


def replicate(module: nn.Module) -> nn.Module:
    """A whole, unpartitioned copy of a ZeRO-3 partitioned transformers model, built outside zero.Init, frozen."""
    import deepspeed

    from pretrain.model.build import _zero3_suspended

    params = dict(module.named_parameters())
    with init_empty_weights(include_buffers=False), _zero3_suspended():
        copy = type(module)._from_config(module.config, dtype=next(iter(params.values())).dtype,
                                         attn_implementation=module.config._attn_implementation)
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        state = {name: p.detach().clone() for name, p in params.items()}
    copy.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in copy.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"frozen replica: parameters without values: {left[:5]}")
    device = next(iter(state.values())).device
    return copy.to(device).requires_grad_(False).train(module.training)


class FrozenTower:
    """The replica of a frozen, partitioned vision tower and the swap that runs it. Not an nn.Module attribute
    of the training module, so ZeRO-3, the optimizer and the checkpoints never see it."""

    def __init__(self, vlm: nn.Module) -> None:
        self.vlm = vlm
        self.replica: nn.Module | None = None

    def refresh(self) -> None:
        """(Re)build the replica from the partitioned tower: at start and after a checkpoint was loaded."""
        self.replica = replicate(self.vlm.model.vision_tower)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The replica in the tower's place for the calls inside (transformers' get_image_features looks it up)."""
        if self.replica is None:
            yield
            return
        inner = self.vlm.model
        partitioned = inner._modules["vision_tower"]
        self.replica.train(partitioned.training)
        inner._modules["vision_tower"] = self.replica
        try:
            yield
        finally:
            inner._modules["vision_tower"] = partitioned


def frozen_tower_for(vlm: nn.Module, stage: str, enabled: bool) -> FrozenTower | None:
    """The replica of the tower when `stage` freezes it, the tower is partitioned and `enabled`; else None."""
    tower = vlm.model.vision_tower
    if not (enabled and "vision" not in trainable_components(stage) and _is_partitioned(tower)):
        return None
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError(f"stage {stage}: the vision tower should be frozen before it is replicated")
    frozen = FrozenTower(vlm)
    frozen.refresh()
    return frozen
