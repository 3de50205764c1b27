"""Training stages and parameter groups.

align: projector only (LLaVA stage 1). finetune: projector + decoder (LLaVA stage 2). full: everything, the vision
tower included. Frozen parameters get requires_grad=False and no optimizer group, so they carry no optimizer state
(DeepSpeed keeps them out of its fp32 master copy too). The fixed identity layer of a `linear` projector is frozen in
every stage. Biases and norm weights get no weight decay.

With LoRA (`model.lora`, pretrain.model.lora) the adapted components train their adapters only: the decoder's (and
with `lora.vision` the tower's) base weights stay frozen in every stage, so the optimizer holds state for the
adapters and the projector (and a fully trained part, e.g. the tower in `full` without `lora.vision`). Adapters take
their component's learning-rate multiplier (`train.lr_multipliers.llm`), the projector its own: LLaVA's
`mm_projector_lr`.
"""

from __future__ import annotations

from torch import nn
from transformers import LlavaForConditionalGeneration

from pretrain.model.flops import trainable_components
from pretrain.model.lora import is_adapter
from pretrain.model.projector import frozen_names


def component_of(name: str) -> str:
    if name.startswith("alignment."):
        return "alignment"  # contrastive / ITM heads of VLMForTraining: trained in every stage
    if "multi_modal_projector" in name or name.endswith("image_newline"):
        return "projector"  # LlavaNext's learned row end trains with the projector, as in LLaVA-NeXT's stage 1
    if "vision_tower" in name:
        return "vision"
    return "llm"


def apply_stage(model: LlavaForConditionalGeneration, stage: str,
                adapted: frozenset[str] = frozenset()) -> dict[str, int]:
    """Freeze by stage; in the `adapted` components (LoRA) only the adapters train. Returns trainable parameter
    counts per component (ZeRO-3 aware)."""
    trainable = trainable_components(stage)  # the one stage table, shared with the cost model
    fixed = frozen_names(model.config)
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        comp = component_of(name)
        base_frozen = comp in adapted and not is_adapter(name)
        p.requires_grad_(comp in trainable and not base_frozen and not name.endswith(fixed))
        if p.requires_grad:
            counts[comp] = counts.get(comp, 0) + (p.ds_numel if hasattr(p, "ds_numel") else p.numel())
    return counts


def param_groups(model: nn.Module, lr: float, weight_decay: float, multipliers: dict[str, float]) -> list[dict]:
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        comp = component_of(name)
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        if hasattr(p, "ds_shape"):
            no_decay = len(p.ds_shape) < 2 or name.endswith(".bias") or "norm" in name.lower()
        key = (comp, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "name": f"{comp}{'_no_decay' if no_decay else ''}",
                           "lr": lr * multipliers.get(comp, 1.0), "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
