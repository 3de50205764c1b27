"""Committed checkpoint -> Hugging Face directory loadable as LlavaForConditionalGeneration + its processor.

Weights are consolidated from DeepSpeed's shards with DeepSpeed's own tool (any ZeRO stage, any world size), the
`vlm.` prefix of our training wrapper is dropped, and transformers' save_pretrained writes safetensors shards with
an index, mapping in-memory names to its on-disk names itself (no key surgery here).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from pretrain.train import checkpoint as ckpt

log = logging.getLogger(__name__)
PREFIX = "vlm."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag directory, a run's `checkpoints/` folder (its newest committed), or a run directory."""
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


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


def processor_from(meta: Path, config: LlavaConfig) -> LlavaProcessor:
    tokenizer = AutoTokenizer.from_pretrained(meta)
    image_processor = AutoImageProcessor.from_pretrained(meta)
    vision = config.vision_config
    has_cls = vision.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        patch_size=vision.patch_size, vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0, image_token="<image>")


def convert(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", max_shard_size: str = "5GB") -> Path:
    tag_dir = resolve_checkpoint(checkpoint)
    meta = tag_dir / ckpt.HF_META
    config = LlavaConfig.from_pretrained(meta)
    state = consolidated_state_dict(tag_dir)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    model = model.to(DTYPES[dtype])
    model.config.use_cache = True
    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    model.generation_config.save_pretrained(out)
    processor_from(meta, config).save_pretrained(out)
    log.info("exported %s -> %s (%s)", tag_dir, out, dtype)
    return out
