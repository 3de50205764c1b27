"""LoRA / QLoRA adapters on the Llava model, built with PEFT (`model.lora` in the config).

PEFT injects its LoRA layers in place (`inject_adapter_in_model`), so the model stays a LlavaForConditionalGeneration:
a targeted linear `...q_proj` becomes `...q_proj.base_layer` (the frozen original) + `...q_proj.lora_A.default` /
`lora_B.default` (+ `lora_magnitude_vector.default` with DoRA). The stage table still says which components train;
with LoRA the adapted components (the decoder, and the tower with `vision`) train their adapters only, their base
stays frozen and so carries no optimizer state (pretrain.model.stages). The projector trains in full, as in LLaVA.

Targets are the decoder's linear layers (LLaVA's find_all_linear_names: every nn.Linear of the decoder, the LM head
excluded), given to PEFT as one anchored regular expression over full module names, so a name shared with the tower
(`q_proj` in CLIP) never adapts the tower unless `vision` asks for it. The same expression goes into the exported
adapter_config.json.

ZeRO-3: the model is partitioned when the adapters are injected. PEFT reads only `in_features` / `out_features` of
a base layer (DoRA's weight norm is gathered by PEFT itself under transformers' ZeRO-3 switch), and the new adapter
weights are created whole on every rank from one seed, then partitioned like the other late parameters
(ZeroContext.partition). Checkpoints hold the adapters as DeepSpeed holds any trained parameter (fp32 master
partitions), and the export reads them from there: never from a live partitioned parameter, which is what saves
PEFT adapters as empty [0] tensors under ZeRO-3 elsewhere.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pretrain.config import ConfigError, LoraConfig

DECODER = "model.language_model"
TOWER = "model.vision_tower"
ADAPTER_MARK = "lora_"  # in the name of every parameter PEFT's LoRA adds (lora_A, lora_B, lora_magnitude_vector)


def is_adapter(name: str) -> bool:
    return f".{ADAPTER_MARK}" in name


def adapted_components(lcfg: LoraConfig) -> frozenset[str]:
    """The components whose base weights LoRA freezes (their adapters train instead)."""
    if not lcfg.enabled:
        return frozenset()
    return frozenset({"llm", "vision"} if lcfg.vision else {"llm"})


def linear_names(model: nn.Module, prefix: str) -> list[str]:
    """Full names of the nn.Linear modules under `prefix` (LLaVA's find_all_linear_names, per component)."""
    root = model.get_submodule(prefix)
    return [f"{prefix}.{name}" for name, m in root.named_modules() if isinstance(m, nn.Linear)]


def target_pattern(model: nn.Module, lcfg: LoraConfig) -> str:
    """The regular expression PEFT fully matches against module names; a ConfigError when targets match nothing."""
    decoder = linear_names(model, DECODER)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in decoder})
    wanted = lcfg.target_modules or leaves
    unknown = [t for t in wanted if t not in leaves]
    if unknown:
        raise ConfigError(f"model.lora.target_modules: {unknown} match no linear layer of the decoder; its linear "
                          f"layers are: {', '.join(leaves)}")
    alternatives = "|".join(re.escape(t) for t in wanted)
    pattern = rf"{re.escape(DECODER)}\..*\.({alternatives})"
    if lcfg.vision:
        pattern = rf"({pattern}|{re.escape(TOWER)}\..*\.({'|'.join(_tower_leaves(model))}))"
    return pattern


def _tower_leaves(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in linear_names(model, TOWER)})


def peft_config(model: nn.Module, lcfg: LoraConfig):  # -> peft.LoraConfig
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                          target_modules=target_pattern(model, lcfg), use_rslora=lcfg.rslora, use_dora=lcfg.dora,
                          bias="none")


def add_adapters(model: nn.Module, lcfg: LoraConfig, seed: int) -> int:
    """Inject the adapters (before ZeRO-3 partitions the new weights); returns how many layers were adapted."""
    from peft import inject_adapter_in_model

    config = peft_config(model, lcfg)
    torch.manual_seed(seed)  # the same A matrices on every rank and for every ZeRO stage
    inject_adapter_in_model(config, model)
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    # PEFT marks only its adapters as trainable; the stage table decides (pretrain.model.stages.apply_stage).
    return adapted


def scaling(lcfg: LoraConfig) -> float:
    """PEFT's scale of B @ A: alpha / r, or alpha / sqrt(r) with rslora."""
    return lcfg.alpha / (lcfg.r**0.5 if lcfg.rslora else lcfg.r)


def merged_weight(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The base weight with the adapter folded in, in fp32 (PEFT's merge: W + s B A; DoRA rescales each output row
    of that to its learned magnitude)."""
    w = base.float() + scale * (b.float() @ a.float())
    if magnitude is not None:
        w = w * (magnitude.float() / w.norm(p=2, dim=1)).unsqueeze(1)
    return w


def check_quantize(lcfg: LoraConfig) -> None:
    if lcfg.enabled and lcfg.quantize != "none" and not torch.cuda.is_available():
        raise ConfigError("model.lora.quantize=nf4 needs a CUDA GPU (bitsandbytes 4-bit weights); this machine has "
                          "none: set model.lora.quantize=none to train plain LoRA here")


def quantized_loading(lcfg: LoraConfig, dtype: torch.dtype, skip: list[str]) -> dict:
    """from_pretrained arguments that load the linear layers in NF4 (QLoRA) on this rank's GPU, the modules in
    `skip` (tower, projector, LM head) kept in `dtype`; {} without quantize."""
    if not lcfg.enabled or lcfg.quantize == "none":
        return {}
    import os

    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                               llm_int8_skip_modules=skip)
    return {"quantization_config": quant, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
