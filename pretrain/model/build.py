"""Assemble a LLaVA-style model: decoder + vision tower + projector, as transformers' LlavaForConditionalGeneration.

Each component comes from a hub id, a local directory (the same `from_pretrained` path) or an inline config for
random init. Under ZeRO-3 every component is created inside `deepspeed.zero.Init`, so no rank ever holds the whole
model: transformers enters zero.Init itself while an `HfDeepSpeedConfig` is alive, and we enter it for the projector.
The Llava shell is built on the meta device and its submodules replaced by the partitioned components.

`model.init_from` loads a whole export instead (transformers loads into the partitioned model). Then the tokenizer's
added tokens grow the embeddings (resize_vocab; the new rows are partitioned at once), and `model.projector_from`
overwrites the projector inside a gather (pretrain.model.projector). Attention: pretrain.model.attention.
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
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from pretrain.config import ConfigError, ModelConfig
from pretrain.model.attention import AttentionChoice, resolve_attention
from pretrain.model.components import load_component_config
from pretrain.model.lora import add_adapters, check_quantize, quantized_loading
from pretrain.model.projector import ACTIVATION, is_linear, load_projector, projector_activation, set_identity
from pretrain.tokens import IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN

log = logging.getLogger(__name__)

@dataclass
class ZeroContext:
    """What the builder needs to know about DeepSpeed: the config dict when ZeRO-3 partitions at construction."""

    ds_config: dict[str, Any] | None = None

    @property
    def zero3(self) -> bool:
        return bool(self.ds_config) and self.ds_config.get("zero_optimization", {}).get("stage") == 3

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config) and bool(self.ds_config.get("bf16", {}).get("enabled"))

    def init(self) -> contextlib.AbstractContextManager:
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=self.ds_config)

    def partition(self, module: nn.Module) -> None:
        """Partition parameters created outside zero.Init (rank 0's values win), e.g. resized embeddings."""
        if self.zero3 and any(not hasattr(p, "ds_id") for p in module.parameters()):
            import deepspeed

            deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config)


def _is_local_or_hub(spec: str | dict) -> bool:
    return isinstance(spec, str)


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
    strategy = select_strategy(mcfg, vision_cfg)
    text_cfg.vocab_size = max(text_cfg.vocab_size, len(tokenizer))
    anyres = {}
    if mcfg.image_tiling == "anyres":
        from pretrain.data.anyres import grid_pinpoints

        anyres = {"image_grid_pinpoints": grid_pinpoints(mcfg.image_grid_pinpoints, vision_cfg.image_size,
                                                         mcfg.max_image_tiles)}
    if anyres and VIDEO_TOKEN in tokenizer.get_vocab():  # a video run (data.video_frames): pretrain/model/video.py
        anyres["video_token_id"] = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    config_class = LlavaNextVideoConfig if "video_token_id" in anyres else LlavaNextConfig if anyres else LlavaConfig
    return config_class(
        **anyres,
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act=projector_activation(mcfg.projector),
        vision_feature_layer=mcfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_token_count(vision_cfg, strategy),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=getattr(text_cfg, "tie_word_embeddings", False),
    )


# Grown vocabularies are padded to a multiple of this (as LLaVA-1.5's HF checkpoints are): tensor-core friendly.
VOCAB_MULTIPLE = 64


def attention_for(mcfg: ModelConfig, zero: ZeroContext, packing: bool = False) -> AttentionChoice:
    return resolve_attention(mcfg.attn_implementation, half_precision=zero.bf16, packing=packing)


def _load_decoder(mcfg: ModelConfig, text_cfg: PretrainedConfig, attn: str, dtype: torch.dtype) -> nn.Module:
    if isinstance(mcfg.llm, str):
        quant = quantized_loading(mcfg.lora, dtype, skip=["lm_head"])
        return AutoModelForCausalLM.from_pretrained(mcfg.llm, dtype=dtype, attn_implementation=attn, **quant)
    if mcfg.lora.quantize != "none":
        raise ConfigError("model.lora.quantize=nf4 loads the decoder's weights quantized: model.llm must be a "
                          "directory or hub id, not an inline config")
    model_cls = AutoModelForCausalLM._model_mapping[type(text_cfg)]
    return model_cls._from_config(text_cfg, dtype=dtype, attn_implementation=attn)


def _load_vision(mcfg: ModelConfig, vision_cfg: PretrainedConfig, attn: str, dtype: torch.dtype) -> nn.Module:
    model_cls = AutoModel._model_mapping[type(vision_cfg)]
    if isinstance(mcfg.vision, str):
        return model_cls.from_pretrained(mcfg.vision, dtype=dtype, attn_implementation=attn)
    return model_cls._from_config(vision_cfg, dtype=dtype, attn_implementation=attn)


def build_model(
    mcfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    zero: ZeroContext | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    packing: bool = False,
) -> LlavaForConditionalGeneration:
    """Build the VLM. With ZeRO-3 in `zero`, the caller must keep an HfDeepSpeedConfig alive around this call.
    `packing`: the batches hold packed rows (data.packing), which `auto` attention takes into account.

    Each random initialisation is seeded on its own, so the weights are the same on every rank and for every ZeRO
    stage (zero.Init and loading consume the RNG differently)."""
    zero = zero or ZeroContext()
    check_quantize(mcfg.lora)
    attn = attention_for(mcfg, zero, packing)
    if mcfg.init_from:
        model = _from_export(mcfg, attn, dtype)
    else:
        model = _assemble(mcfg, tokenizer, zero, attn, dtype, seed)
    torch.manual_seed(seed + 3)
    resize_vocab(model, tokenizer)
    if mcfg.lora.enabled:  # the new adapter weights are partitioned with the grown rows, just below
        layers = add_adapters(model, mcfg.lora, seed + 5)
        log.info("LoRA r=%d on %d linear layers", mcfg.lora.r, layers)
    zero.partition(model)
    if mcfg.projector_from:
        loaded = load_projector(model.model.multi_modal_projector, mcfg.projector_from, is_linear(model.config))
        log.info("projector %s loaded from %s", loaded, mcfg.projector_from)
    model.config.use_cache = False
    return model


def _assemble(mcfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, zero: ZeroContext, attn: AttentionChoice,
              dtype: torch.dtype, seed: int) -> LlavaForConditionalGeneration:
    """Decoder, tower and projector built (partitioned under ZeRO-3) and put into an empty Llava shell."""
    llava_cfg = build_llava_config(mcfg, tokenizer)
    torch.manual_seed(seed)
    decoder = _load_decoder(mcfg, llava_cfg.text_config, attn.decoder, dtype)
    torch.manual_seed(seed + 1)
    vision = _load_vision(mcfg, llava_cfg.vision_config, attn.vision, dtype)
    torch.manual_seed(seed + 2)
    with zero.init():
        projector = LlavaMultiModalProjector(llava_cfg).to(dtype)
    if is_linear(llava_cfg):
        set_identity(projector)
    if isinstance(llava_cfg, LlavaNextConfig | LlavaNextVideoConfig):
        newline = _image_newline(llava_cfg, dtype, seed)
    # Parameters on meta only (buffers such as rotary tables stay real): the shell costs no memory.
    with init_empty_weights(include_buffers=False), _zero3_suspended():
        model = model_class(llava_cfg)(llava_cfg)
    if isinstance(llava_cfg, LlavaNextConfig | LlavaNextVideoConfig):
        model.model.image_newline = newline
    model.model.vision_tower = vision
    model.model.multi_modal_projector = projector
    model.model.language_model = decoder.get_decoder()
    model.lm_head = decoder.get_output_embeddings()
    model.config.text_config = decoder.config
    model.config.vision_config = vision.config
    _check_no_meta(model)
    return model


def model_class(config: PretrainedConfig) -> type[LlavaForConditionalGeneration]:
    """Llava for one tile per image; LlavaNext for AnyRes; LlavaNextVideo for AnyRes with video (its images are
    LlavaNext's: pretrain/model/video.py). LlavaNext rather than LlavaOnevision: its AnyRes is
    the plain one (best-fit grid, unpad, newline per row) with no pooling of large grids, so every tile's tokens
    reach the decoder as trained, and its processor counts those tokens from the image size alone."""
    if isinstance(config, LlavaNextVideoConfig):
        return LlavaNextVideoForConditionalGeneration
    return LlavaNextForConditionalGeneration if isinstance(config, LlavaNextConfig) else LlavaForConditionalGeneration


def _image_newline(config: LlavaNextConfig, dtype: torch.dtype, seed: int) -> nn.Parameter:
    """LlavaNext's learned end-of-row embedding, initialised as transformers does (N(0, 1 / hidden))."""
    hidden = config.text_config.hidden_size
    gen = torch.Generator().manual_seed(seed + 4)  # the same values on every rank; build_model partitions it
    return nn.Parameter((torch.randn(hidden, generator=gen) / hidden**0.5).to(dtype))


def _from_export(mcfg: ModelConfig, attn: AttentionChoice, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """A whole exported Llava or LlavaNext (ours or public): transformers loads it into the partitioned model
    under ZeRO-3."""
    if not Path(mcfg.init_from).exists() and mcfg.init_from.startswith((".", "/")):
        raise ConfigError(f"model.init_from: {mcfg.init_from} does not exist")
    cls = model_class(AutoConfig.from_pretrained(mcfg.init_from))
    quant = quantized_loading(mcfg.lora, dtype, skip=["vision_tower", "multi_modal_projector", "lm_head"])
    model = cls.from_pretrained(mcfg.init_from, dtype=dtype, attn_implementation=attn.as_hf(), **quant)
    _check_agrees(mcfg, model.config)
    return model


def _check_agrees(mcfg: ModelConfig, cfg: LlavaConfig) -> None:
    """Keys the user set explicitly must describe the export they start from (its config wins otherwise)."""
    have = {"projector": cfg.projector_hidden_act, "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy}
    want = {"projector": ACTIVATION.get(mcfg.projector), "vision_feature_layer": mcfg.vision_feature_layer,
            "vision_feature_select_strategy": mcfg.vision_feature_select_strategy}
    for key in sorted(mcfg.model_fields_set & set(have)):
        if want[key] is not None and want[key] != have[key]:
            shown = mcfg.projector if key == "projector" else want[key]
            raise ConfigError(f"model.{key}={shown!r} but model.init_from={mcfg.init_from} has "
                              f"{'projector_hidden_act' if key == 'projector' else key}={have[key]!r}; "
                              "drop the key or start from another export")


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


def resize_vocab(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings (and an untied lm_head) for added tokens (image, pad), to a multiple of VOCAB_MULTIPLE.

    transformers gathers the partitioned rows under ZeRO-3 and, with mean_resizing, sets each new row to the mean of
    the existing rows (plus noise of 1e-9 x their covariance): LLaVA's own rule for <image>/<pad>, the embedding
    statistics rather than a random init at `initializer_range`, and for the output rows a logit that starts at the
    average of the others. Under ZeRO-3 transformers builds the new matrix whole on every rank (outside zero.Init);
    build_model partitions it right after (ZeroContext.partition)."""
    current = model.get_input_embeddings().weight
    rows = current.ds_shape[0] if hasattr(current, "ds_shape") else current.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=True)
        log.info("embeddings resized %d -> %d rows for the added tokens", rows,
                 model.get_input_embeddings().num_embeddings)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if hasattr(model.config, "video_token_id"):
        model.config.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    model.config.pad_token_id = tokenizer.pad_token_id


def _check_no_meta(model: nn.Module) -> None:
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"parameters left on the meta device after assembly: {left[:5]}")


def load_tokenizer(mcfg: ModelConfig, video: bool = False) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer with the image token (the video token with `video`, and a pad token, where missing)
    added."""
    from transformers import AutoTokenizer

    source = mcfg.tokenizer or mcfg.init_from or (mcfg.llm if _is_local_or_hub(mcfg.llm) else None)
    if source is None:
        raise ConfigError("model.tokenizer is required when model.llm is an inline config")
    if not isinstance(source, str) or (source.startswith((".", "/")) and not Path(source).exists()):
        raise ConfigError(f"model.tokenizer: {source!r} does not exist")
    tok = AutoTokenizer.from_pretrained(source)
    added = {}
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN if video else None) if t and t not in tok.get_vocab()]
    if missing:
        added["additional_special_tokens"] = missing
    if tok.pad_token is None:
        added["pad_token"] = PAD_TOKEN
    if added:
        tok.add_special_tokens(added, replace_extra_special_tokens=False)
    return tok
