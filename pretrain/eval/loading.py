"""A committed training checkpoint -> the training module (VLMForTraining) in one process, for evaluation.

The Llava model goes through the project's own export (`pretrain.export.hf.convert` into a temporary directory, then
`from_pretrained`): every ZeRO stage, frozen weights the checkpoint lacks taken from the run's sources, tied weights,
all handled in one place, and evaluation scores exactly what a user of the export gets. The alignment heads
(`alignment.*`: contrastive projections, temperature, ITM head), which the export leaves out, are read tensor by
tensor from the DeepSpeed shards (pretrain.export.zero). The tokenizer and image processor come with the export, so
evaluation preprocesses exactly as training did.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from pretrain.config import Config
from pretrain.data.image import ImageTransform
from pretrain.data.sample import SampleProcessor
from pretrain.data.text import TextProcessor
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
        return self.module._device()


def _load_heads(module: VLMForTraining, tag_dir: Path) -> None:
    """Copy `alignment.*` from the checkpoint into the module's heads (fp32 master weights where trained)."""
    from pretrain.export.zero import ZeroCheckpoint

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
    from pretrain.export.hf import convert, resolve_checkpoint

    tag_dir = resolve_checkpoint(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else torch.float32
    with tempfile.TemporaryDirectory(prefix="pretrain-eval-") as tmp:
        hf_dir = convert(tag_dir, Path(tmp) / "hf", "fp32")
        vlm = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        transform = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(hf_dir))
    module = VLMForTraining(vlm, cfg.objectives, seed=cfg.run.seed)
    if module.alignment is not None:
        _load_heads(module, tag_dir)
    module = module.to(device=device, dtype=dtype).eval()
    config = vlm.config
    text = TextProcessor(tokenizer, config.image_token_id, config.image_seq_length, cfg.data.max_length)
    processor = SampleProcessor(text, transform, cfg.data.max_image_pixels)
    return EvalModel(module, tokenizer, transform, processor, tag_dir, ckpt.read_meta(tag_dir).get("step", -1))
