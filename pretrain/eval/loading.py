"""A committed training checkpoint -> the training module (VLMForTraining) in one process, for evaluation.

No export is written: the model is built in the compute dtype on the evaluation device, and the tensors the export
would write are copied into it as they stream from DeepSpeed's shards (the export's own plan: fp32 master weights
for trained tensors, frozen ones from the checkpoint or the run's sources, tied weights once; export/zero.py reads
them piece by piece), so evaluation scores what a user of the export gets without first writing a full fp32 copy
to a local disk (4 bytes per parameter: ~28 GB for a 7B model). The alignment heads (`alignment.*`: contrastive
projections, temperature, ITM head), which the export leaves out, are read the same way. The tokenizer and image
processor are the run's (the checkpoint's hf_meta), and the sample processor is the one training builds
(pretrain.model.processing), so evaluation preprocesses as training did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from pretrain.config import Config
from pretrain.data.image import ImageTransform
from pretrain.data.sample import SampleProcessor
from pretrain.export.hf import PREFIX, _Sources, plan, resolve_checkpoint, run_model_config
from pretrain.export.layout import export_layout
from pretrain.export.lora import LoraSources
from pretrain.export.zero import ZeroCheckpoint
from pretrain.model.build import model_class
from pretrain.model.processing import sample_processor
from pretrain.model.vlm import VLMForTraining
from pretrain.train import checkpoint as ckpt


@dataclass
class EvalModel:
    module: VLMForTraining
    tokenizer: Any
    transform: ImageTransform
    processor: SampleProcessor  # raw sample -> model inputs, as the training loader builds them
    checkpoint: Path
    step: int

    @property
    def device(self) -> torch.device:
        return self.module.param_device()


def _copy_pieces(target: torch.Tensor, pieces: Iterable[torch.Tensor], name: str) -> None:
    """Fill `target` (any dtype and device) from a stream of flat pieces, in order."""
    flat, offset = target.view(-1), 0
    for piece in pieces:
        flat[offset : offset + piece.numel()].copy_(piece.reshape(-1))
        offset += piece.numel()
    if offset != flat.numel():
        raise RuntimeError(f"{name}: {offset} values in the checkpoint, {flat.numel()} in the model")


@torch.no_grad()
def load_llava(tag_dir: Path, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """The Llava (LlavaNext for AnyRes) model of a checkpoint, built on `device` in `dtype`, holding the weights the
    export would write (the export's own plan and lazily opened sources, so both read the same tensors from the same
    places)."""
    config = AutoConfig.from_pretrained(tag_dir / ckpt.HF_META)
    config.use_cache = config.text_config.use_cache = True  # as the export sets it: generation wants the cache
    zero = ZeroCheckpoint(tag_dir)
    mcfg = run_model_config(tag_dir)
    lora = LoraSources(zero, PREFIX, mcfg.lora if mcfg else None)  # a LoRA run: its adapters merged, as exported
    planned = plan(export_layout(config), zero, _Sources(mcfg), frozen_from="checkpoint", lora=lora)
    with torch.device(device), no_init_weights():  # every weight is overwritten below: skip the random init
        vlm = model_class(config)._from_config(config, dtype=dtype)
    state = vlm.state_dict()  # the layout's names are this model's (tied duplicates share their partner's data)
    for p in planned:
        _copy_pieces(state[p.tensor.name], p.pieces(), PREFIX + p.tensor.name)
    zero.release()
    vlm.tie_weights()
    return vlm.eval()


def _load_heads(module: VLMForTraining, tag_dir: Path) -> None:
    """Copy `alignment.*` from the checkpoint into the module's heads (fp32 master weights where trained)."""
    zero = ZeroCheckpoint(tag_dir)
    for name, tensor in module.alignment.state_dict().items():
        held = zero.resolve("alignment." + name)
        if held is None:
            raise RuntimeError(f"{tag_dir} has no alignment.{name}, but the config enables objectives."
                               "contrastive_weight or itm_weight: evaluate with the run's own config.yaml")
        if tuple(zero.locs[held].shape) != tuple(tensor.shape):
            raise RuntimeError(f"alignment.{name}: shape {zero.locs[held].shape} in {tag_dir}, {tuple(tensor.shape)} "
                               "in the config (objectives.embed_dim?)")
        flat = torch.cat([piece.float() for piece in zero.pieces(held)])
        tensor.copy_(flat[: math.prod(tensor.shape)].view(tensor.shape))


def load_eval_model(cfg: Config, checkpoint: str | Path, device: str | torch.device | None = None) -> EvalModel:
    tag_dir = resolve_checkpoint(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else torch.float32
    vlm = load_llava(tag_dir, device, dtype)
    module = VLMForTraining(vlm, cfg.objectives, seed=cfg.run.seed)
    if module.alignment is not None:
        _load_heads(module, tag_dir)
    module = module.to(device=device, dtype=dtype).eval()
    meta = tag_dir / ckpt.HF_META
    tokenizer = AutoTokenizer.from_pretrained(meta)
    processor = sample_processor(cfg, tokenizer, vlm.config, AutoImageProcessor.from_pretrained(meta))
    return EvalModel(module, tokenizer, processor.image_transform, processor, tag_dir,
                     ckpt.read_meta(tag_dir).get("step", -1))
