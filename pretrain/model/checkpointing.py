"""Activation checkpointing for the decoder and the vision tower: non-reentrant, every layer or every k-th.

Non-reentrant (`use_reentrant=False`): the reentrant variant gives no parameter gradients to a checkpointed segment
whose inputs do not require grad (the vision tower's first layer, fed by pixels, in stage `full`), and it is the
variant PyTorch recommends and keeps. Each stack is switched on its own, so `every_k` counts that stack's layers
from 0 (transformers' `every_n_layers` over the whole Llava model would carry the count from the tower into the
decoder).
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration, PreTrainedModel

MODES = ("none", "full", "every_k")


def checkpointed_stacks(model: LlavaForConditionalGeneration) -> dict[str, PreTrainedModel]:
    return {"llm": model.model.language_model, "vision": model.model.vision_tower}


def enable_activation_checkpointing(model: LlavaForConditionalGeneration, mode: str, every_k: int = 1) -> None:
    """`full`: every layer of both stacks; `every_k`: layers 0, k, 2k, ... of each; `none`: nothing."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} (valid: {', '.join(MODES)})")
    if mode == "none":
        return
    every = every_k if mode == "every_k" else 1
    for stack in checkpointed_stacks(model).values():
        stack.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=every)
    model.config.use_cache = False


def checkpointed_layers(model: LlavaForConditionalGeneration) -> dict[str, list[int]]:
    """Indices of the layers that recompute in the backward pass, per stack (for logs and tests)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    out = {}
    for name, stack in checkpointed_stacks(model).items():
        layers = [m for m in stack.modules() if isinstance(m, GradientCheckpointingLayer)]
        out[name] = [i for i, m in enumerate(layers) if m.gradient_checkpointing]
    return out
