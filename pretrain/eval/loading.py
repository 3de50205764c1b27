"""A committed training checkpoint -> the training module (VLMForTraining) in one process, for evaluation.

DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`: any ZeRO stage, any world size) gives
the full state dict; `vlm.*` is the Llava model (what the Hugging Face export writes) and `alignment.*` the
contrastive / ITM heads, which evaluation needs for retrieval but the export leaves out. The Llava config, tokenizer
and image processor come from the checkpoint's `hf_meta/`, so evaluation sees exactly what training saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from pretrain.config import Config
from pretrain.data.image import ImageTransform
from pretrain.data.sample import SampleProcessor
from pretrain.data.text import TextProcessor
from pretrain.model.vlm import VLMForTraining
from pretrain.train import checkpoint as ckpt

log = logging.getLogger(__name__)


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed tag directory, or the newest committed one under a run directory or its `checkpoints/`."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not (path / ckpt.COMMIT_MARKER).exists():
        found = ckpt.find_resume(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no committed checkpoint")
        path = found
    if not ckpt.is_committed(path):
        raise FileNotFoundError(f"{path}: not a committed, intact checkpoint")
    return path


def _full_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_eval_model(cfg: Config, checkpoint: str | Path, device: str | torch.device | None = None) -> EvalModel:
    tag_dir = resolve_checkpoint(checkpoint)
    meta = tag_dir / ckpt.HF_META
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else torch.float32
    config = LlavaConfig.from_pretrained(meta)
    state = _full_state_dict(tag_dir)
    # Parameters on meta (no random init, no memory), buffers such as rotary tables real; then the weights assigned.
    with init_empty_weights(include_buffers=False):
        vlm = LlavaForConditionalGeneration(config)
    missing, unexpected = vlm.load_state_dict(_split(state, "vlm."), strict=False, assign=True)
    tied = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{tag_dir}: checkpoint does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if tied:
        vlm.tie_weights()
    module = VLMForTraining(vlm, cfg.objectives, seed=cfg.run.seed)
    heads = _split(state, "alignment.")
    if module.alignment is not None:
        if not heads:
            raise RuntimeError(f"{tag_dir} has no alignment heads but the config enables objectives.contrastive_weight "
                               "or itm_weight: evaluate with the run's own config.yaml")
        module.alignment.load_state_dict(heads)
    elif heads:
        log.warning("%s has alignment heads that this config does not enable; retrieval uses likelihoods", tag_dir)
    module = module.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(meta)
    transform = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(meta))
    text = TextProcessor(tokenizer, config.image_token_id, config.image_seq_length, cfg.data.max_length)
    processor = SampleProcessor(text, transform, cfg.data.max_image_pixels)
    return EvalModel(module, tokenizer, transform, processor, tag_dir, ckpt.read_meta(tag_dir).get("step", -1))
