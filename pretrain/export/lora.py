"""A LoRA run's checkpoint, exported two ways.

Merged (`pretrain convert CKPT OUT`): each adapted linear's weight is its frozen base with the adapter folded in
(pretrain.model.lora.merged_weight), the same plain Llava / LlavaNext directory as any run's. The checkpoint names a
base weight `...q_proj.base_layer.weight`; the export names it `...q_proj.weight`. A merged tensor is built whole in
fp32 (one linear layer at a time: 4096 x 11008 x 4 bytes = 180 MB for a 7B decoder), the rest streams as before.

Adapter (`pretrain convert CKPT OUT --adapter`): a PEFT adapter directory over the model the run started from
(`model.init_from`): adapter_config.json (the run's r, alpha, dropout, target pattern, rslora, dora) and
adapter_model.safetensors with PEFT's key names: `base_model.model.<module>.lora_A.weight` for the adapters, and
the parts trained in full (the projector, the tower in `full` without lora.vision) under modules_to_save as
`base_model.model.<module>.<param>`, so that `PeftModel.from_pretrained(base, OUT)` loads it (PEFT puts those back
into its modules_to_save copies). Every tensor comes from the checkpoint's fp32 master weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.config import LoraConfig, ModelConfig
from pretrain.export.zero import ZeroCheckpoint
from pretrain.model.lora import merged_weight, scaling

BASE = ".base_layer"
ADAPTER = "default"  # PEFT's adapter name, which its saved keys leave out
CHUNK = 8 << 20  # elements per yielded piece of a merged tensor


def base_name(name: str) -> str:
    """`...q_proj.base_layer.weight` -> `...q_proj.weight` (the name the plain model gives it)."""
    return name.replace(BASE + ".", ".")


def _whole(zero: ZeroCheckpoint, name: str) -> torch.Tensor:
    return torch.cat([p.reshape(-1).float() for p in zero.pieces(name)]).reshape(zero.locs[name].shape)


class LoraSources:
    """Where the merged export finds an adapted layer's parts in a checkpoint (names with the `vlm.` prefix). A
    QLoRA run's checkpoint holds its base weights in 4 bits: `source_base` then reads the unquantized originals
    (the run's model.init_from / model.llm) by export name."""

    def __init__(self, zero: ZeroCheckpoint, prefix: str, lcfg: LoraConfig | None,
                 source_base: Callable[[str], Iterator[torch.Tensor]] | None = None) -> None:
        self.zero, self.prefix = zero, prefix
        self.scale = scaling(lcfg) if lcfg is not None and lcfg.enabled else None
        self.source_base = source_base if lcfg is not None and lcfg.quantize != "none" else None
        self.renamed = {base_name(n): n for n in zero.locs if BASE + "." in n}
        if self.renamed and self.scale is None:
            raise ValueError("the checkpoint holds LoRA adapters but the run's config (model.lora) is not found: "
                             "give it with --run-config")

    def resolve(self, name: str) -> str | None:
        """The checkpoint name holding the base weight (or bias) of export tensor `name`, or None."""
        return self.renamed.get(self.prefix + name)

    def merged(self, name: str) -> Iterator[torch.Tensor] | None:
        """Pieces of the merged weight of export tensor `name` when it is an adapted linear's weight, else None."""
        held = self.resolve(name)
        if held is None or not held.endswith(BASE + ".weight"):
            return None
        module = held.removesuffix(BASE + ".weight")
        factors = {k: f"{module}.lora_{k}.{ADAPTER}.weight" for k in ("A", "B")}
        if any(p not in self.zero.locs for p in factors.values()):
            return None
        magnitude = f"{module}.lora_magnitude_vector.{ADAPTER}.weight"

        def pieces() -> Iterator[torch.Tensor]:
            m = _whole(self.zero, magnitude) if magnitude in self.zero.locs else None
            shape = self.zero.locs[factors["B"]].shape[0], self.zero.locs[factors["A"]].shape[1]
            base = (torch.cat([p.reshape(-1).float() for p in self.source_base(name)]).reshape(shape)
                    if self.source_base else _whole(self.zero, held))
            w = merged_weight(base, _whole(self.zero, factors["A"]), _whole(self.zero, factors["B"]),
                              self.scale, m).reshape(-1)
            yield from w.split(CHUNK)

        return pieces()


def fully_trained_modules(stage: str, lcfg: LoraConfig) -> list[str]:
    """Modules trained in full next to the adapters: PEFT's modules_to_save."""
    modules = ["multi_modal_projector"]
    if stage == "full" and not lcfg.vision:
        modules.append("vision_tower")
    return modules


def adapter_config(lcfg: LoraConfig, target: str, base: str, modules_to_save: list[str]) -> dict:
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=target,
                            use_rslora=lcfg.rslora, use_dora=lcfg.dora, bias="none",
                            modules_to_save=modules_to_save, base_model_name_or_path=base)
    return config.to_dict()


def write_adapter(zero: ZeroCheckpoint, prefix: str, mcfg: ModelConfig, stage: str, target: str, out: Path) -> Path:
    """adapter_config.json + adapter_model.safetensors (fp32) from the checkpoint's trained tensors."""
    if not mcfg.init_from:
        raise ValueError("--adapter: the adapter applies to the model the run started from, and this run has no "
                         "model.init_from (an exported Llava directory); export it merged instead")
    keep = fully_trained_modules(stage, mcfg.lora)
    tensors = {}
    for name in sorted(zero.trainable):
        inner = name.removeprefix(prefix)
        if ".lora_" in inner:
            key = inner.replace(f".{ADAPTER}.", ".")
            if ".lora_magnitude_vector." in key:  # PEFT saves DoRA's magnitude without the `.weight`
                key = key.removesuffix(".weight")
        elif any(f".{part}." in f".{inner}" for part in keep):
            key = inner
        else:
            raise ValueError(f"{inner}: trained in full but not part of the adapter (an image_newline of AnyRes?); "
                             "export this run merged instead")
        tensors[f"base_model.model.{key}"] = _whole(zero, name).contiguous()
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if empty or not any(".lora_A." in k for k in tensors):
        raise ValueError(f"the checkpoint's adapter is empty or incomplete: {empty[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = adapter_config(mcfg.lora, target, str(Path(mcfg.init_from).resolve()), keep)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    return out
