"""Assemble a LLaVA-style model: decoder + vision tower + projector, as transformers' LlavaForConditionalGeneration.

Each component comes from a hub id, a local directory (the same `from_pretrained` path) or an inline config for
random init. Under ZeRO-3 every component is created inside `deepspeed.zero.Init`, so no rank ever holds the whole
model: transformers enters zero.Init itself while an `HfDeepSpeedConfig` is alive, and we enter it for the projector.
The Llava shell is built on the meta device and its submodules replaced by the partitioned components.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from pretrain.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

VISION_TYPES = {"clip_vision_model", "siglip_vision_model"}
# Full two-tower checkpoints (openai/clip-*, google/siglip-*): the vision half is taken.
TWO_TOWER_TYPES = {"clip", "siglip"}


@dataclass
class ZeroContext:
    """What the builder needs to know about DeepSpeed: the config dict when ZeRO-3 partitions at construction."""

    ds_config: dict[str, Any] | None = None

    @property
    def zero3(self) -> bool:
        return bool(self.ds_config) and self.ds_config.get("zero_optimization", {}).get("stage") == 3

    def init(self) -> contextlib.AbstractContextManager:
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=self.ds_config)


def _is_local_or_hub(spec: str | dict) -> bool:
    return isinstance(spec, str)


def load_component_config(spec: str | dict[str, Any], *, vision: bool) -> PretrainedConfig:
    """A component's config from an inline dict (`model_type` + fields), a local directory or a hub id."""
    if isinstance(spec, dict):
        fields = dict(spec)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"model.{'vision' if vision else 'llm'}: an inline config needs a `model_type`")
        cfg = AutoConfig.for_model(model_type, **fields)
    else:
        cfg = AutoConfig.from_pretrained(spec)
    if vision and cfg.model_type in TWO_TOWER_TYPES:
        cfg = cfg.vision_config
    if vision and cfg.model_type not in VISION_TYPES:
        raise ConfigError(f"model.vision: model_type {cfg.model_type!r} is not a supported vision tower "
                          f"(valid: {sorted(VISION_TYPES | TWO_TOWER_TYPES)})")
    return cfg


def select_strategy(mcfg: ModelConfig, vision_cfg: PretrainedConfig) -> str:
    if mcfg.vision_feature_select_strategy is not None:
        if vision_cfg.model_type == "siglip_vision_model" and mcfg.vision_feature_select_strategy == "default":
            raise ConfigError("model.vision_feature_select_strategy=default drops a CLS token that SigLIP does not "
                              "have; use full (or leave it unset)")
        return mcfg.vision_feature_select_strategy
    return "full" if vision_cfg.model_type == "siglip_vision_model" else "default"


def image_token_count(vision_cfg: PretrainedConfig, strategy: str) -> int:
    """How many image tokens one image becomes: patches, plus CLS when CLIP's is kept."""
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    has_cls = vision_cfg.model_type == "clip_vision_model"
    return patches + (1 if has_cls and strategy == "full" else 0)


def build_llava_config(mcfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    text_cfg = load_component_config(mcfg.llm, vision=False)
    vision_cfg = load_component_config(mcfg.vision, vision=True)
    if mcfg.projector != "mlp2x_gelu":
        # transformers' Llava defines only the 2-layer GELU MLP; other kinds would not export as plain Llava.
        raise ConfigError(f"model.projector={mcfg.projector!r} is not supported yet (valid: mlp2x_gelu)")
    strategy = select_strategy(mcfg, vision_cfg)
    text_cfg.vocab_size = max(text_cfg.vocab_size, len(tokenizer))
    return LlavaConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=mcfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_token_count(vision_cfg, strategy),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=getattr(text_cfg, "tie_word_embeddings", False),
    )


IMAGE_TOKEN = "<image>"


def _attn(mcfg: ModelConfig) -> str:
    # `auto`: transformers picks flash/sdpa when it can; sdpa is the safe default everywhere.
    return "sdpa" if mcfg.attn_implementation == "auto" else mcfg.attn_implementation


def _load_decoder(mcfg: ModelConfig, text_cfg: PretrainedConfig, zero: ZeroContext, dtype: torch.dtype) -> nn.Module:
    if isinstance(mcfg.llm, str):
        return AutoModelForCausalLM.from_pretrained(mcfg.llm, dtype=dtype, attn_implementation=_attn(mcfg))
    model_cls = AutoModelForCausalLM._model_mapping[type(text_cfg)]
    return model_cls._from_config(text_cfg, dtype=dtype, attn_implementation=_attn(mcfg))


def _load_vision(mcfg: ModelConfig, vision_cfg: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    model_cls = AutoModel._model_mapping[type(vision_cfg)]
    if isinstance(mcfg.vision, str):
        return model_cls.from_pretrained(mcfg.vision, dtype=dtype, attn_implementation=_attn(mcfg))
    return model_cls._from_config(vision_cfg, dtype=dtype, attn_implementation=_attn(mcfg))


def build_model(
    mcfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    zero: ZeroContext | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """Build the VLM. With ZeRO-3 in `zero`, the caller must keep an HfDeepSpeedConfig alive around this call.

    Each random initialisation is seeded on its own, so the weights are the same on every rank and for every ZeRO
    stage (zero.Init and loading consume the RNG differently)."""
    zero = zero or ZeroContext()
    if mcfg.init_from:
        model = LlavaForConditionalGeneration.from_pretrained(
            mcfg.init_from, dtype=dtype, attn_implementation=_attn(mcfg))
        _resize_vocab(model, tokenizer)
        return model
    llava_cfg = build_llava_config(mcfg, tokenizer)
    text_cfg, vision_cfg = llava_cfg.text_config, llava_cfg.vision_config
    torch.manual_seed(seed)
    decoder = _load_decoder(mcfg, text_cfg, zero, dtype)
    torch.manual_seed(seed + 1)
    vision = _load_vision(mcfg, vision_cfg, dtype)
    torch.manual_seed(seed + 2)
    with zero.init():
        projector = LlavaMultiModalProjector(llava_cfg).to(dtype)
    # Parameters on meta only (buffers such as rotary tables stay real): the shell costs no memory.
    with init_empty_weights(include_buffers=False), _zero3_suspended():
        model = LlavaForConditionalGeneration(llava_cfg)
    model.model.vision_tower = vision
    model.model.multi_modal_projector = projector
    model.model.language_model = decoder.model
    model.lm_head = decoder.lm_head
    model.config.text_config = decoder.config
    model.config.vision_config = vision.config
    _check_no_meta(model)
    torch.manual_seed(seed + 3)
    _resize_vocab(model, tokenizer)
    model.config.use_cache = False
    return model


@contextlib.contextmanager
def _zero3_suspended():
    """transformers enters zero.Init for every model built while an HfDeepSpeedConfig is alive; the empty shell
    must not be partitioned (its meta parameters have no data), so hide the config for that moment."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def _resize_vocab(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings for added tokens (image, pad); transformers gathers under ZeRO-3 and, with
    mean_resizing, draws the new rows from the old rows' mean and covariance instead of a random scale."""
    current = model.get_input_embeddings().weight
    rows = current.ds_shape[0] if hasattr(current, "ds_shape") else current.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.config.pad_token_id = tokenizer.pad_token_id


def _check_no_meta(model: nn.Module) -> None:
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"parameters left on the meta device after assembly: {left[:5]}")


def load_tokenizer(mcfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer with the image token (and a pad token, where missing) added."""
    from transformers import AutoTokenizer

    source = mcfg.tokenizer or mcfg.init_from or (mcfg.llm if _is_local_or_hub(mcfg.llm) else None)
    if source is None:
        raise ConfigError("model.tokenizer is required when model.llm is an inline config")
    if not isinstance(source, str) or (source.startswith((".", "/")) and not Path(source).exists()):
        raise ConfigError(f"model.tokenizer: {source!r} does not exist")
    tok = AutoTokenizer.from_pretrained(source)
    added = {}
    if IMAGE_TOKEN not in tok.get_vocab():
        added["additional_special_tokens"] = [IMAGE_TOKEN]
    if tok.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tok.add_special_tokens(added, replace_extra_special_tokens=False)
    return tok
