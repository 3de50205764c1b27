"""What LoRA (`model.lora`) changes in the planner's model states: the adapted components' base weights keep only
their 16-bit copy (no gradient, no optimizer state), and the adapters (r x (in + out) per adapted linear, plus one
magnitude per output row with DoRA) are trained. Activations and FLOPs are priced as the stage without LoRA: the
gradient still flows through the whole decoder, and the adapters' matmuls are r/hidden of a linear's."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import LoraConfig
from pretrain.model.flops import VLMShape, count_params, trainable_components


@dataclass(frozen=True)
class LoraCounts:
    adapters: int = 0  # parameters LoRA adds, all trained
    frozen_base: int = 0  # parameters the stage would train that LoRA freezes


def _decoder_linears(shape: VLMShape) -> dict[str, tuple[int, int, int]]:
    """name -> (in, out, count) of the decoder's linear layers (the LM head excluded, as in training)."""
    d = shape.llm
    h, i, q, kv, n = d.hidden, d.intermediate, d.q_dim, d.kv_dim, d.layers
    return {"q_proj": (h, q, n), "k_proj": (h, kv, n), "v_proj": (h, kv, n), "o_proj": (q, h, n),
            "gate_proj": (h, i, n), "up_proj": (h, i, n), "down_proj": (i, h, n)}


def _tower_linears(shape: VLMShape) -> dict[str, tuple[int, int, int]]:
    v = shape.vision
    h, i, n = v.hidden, v.intermediate, v.layers
    return {"q_proj": (h, h, n), "k_proj": (h, h, n), "v_proj": (h, h, n), "out_proj": (h, h, n),
            "fc1": (h, i, n), "fc2": (i, h, n)}


def _adapter_params(linears: dict[str, tuple[int, int, int]], names: list[str] | None, lcfg: LoraConfig) -> int:
    total = 0
    for name, (n_in, n_out, count) in linears.items():
        if names is None or name in names:
            total += count * (lcfg.r * (n_in + n_out) + (n_out if lcfg.dora else 0))
    return total


def lora_counts(shape: VLMShape, lcfg: LoraConfig, stage: str) -> LoraCounts:
    if not lcfg.enabled:
        return LoraCounts()
    trained, counts = trainable_components(stage), count_params(shape)
    adapters = _adapter_params(_decoder_linears(shape), lcfg.target_modules, lcfg)
    frozen = counts.llm if "llm" in trained else 0
    if lcfg.vision:
        adapters += _adapter_params(_tower_linears(shape), None, lcfg)
        frozen += counts.vision if "vision" in trained else 0
    return LoraCounts(adapters, frozen)
