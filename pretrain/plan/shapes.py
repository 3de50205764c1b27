"""The model shape a recipe describes, without downloading anything.

`model.llm` / `model.vision` are inline configs (random init), local directories, or hub ids. A planner must run on a
laptop with no hub access, so the hub ids of the shipped recipes (and a few other well-known ones) resolve from the
table below: the numbers are copied from each repository's config.json. Any other hub id needs the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pretrain.config import ConfigError, ModelConfig
from pretrain.model.flops import VLMShape

_LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_LLAMA2_13B = {**_LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_QWEN25 = {"model_type": "qwen2", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6}
_QWEN25_05B = {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
               "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
_QWEN25_15B = {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
_QWEN25_3B = {**_QWEN25, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
              "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
_QWEN25_7B = {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
_CLIP_L14 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
             "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                  "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_SIGLIP_B16 = {"model_type": "siglip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
               "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
               "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}

# Hub id -> the fields of its (text or vision) config.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "lmsys/vicuna-7b-v1.5": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "lmsys/vicuna-13b-v1.5": _LLAMA2_13B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B,
    "Qwen/Qwen2.5-3B": _QWEN25_3B,
    "Qwen/Qwen2.5-3B-Instruct": _QWEN25_3B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "openai/clip-vit-large-patch14": _CLIP_L14,
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "google/siglip-so400m-patch14-384": _SIGLIP_SO400M,
    "google/siglip-base-patch16-224": _SIGLIP_B16,
}


def component_config(spec: str | dict[str, Any], *, vision: bool) -> PretrainedConfig:
    """A decoder or vision-tower config from an inline dict, a known hub id, or a local directory."""
    what = "model.vision" if vision else "model.llm"
    if isinstance(spec, str) and spec in KNOWN_CONFIGS:
        spec = KNOWN_CONFIGS[spec]
    if isinstance(spec, dict):
        fields = dict(spec)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"{what}: an inline config needs a `model_type`")
        cfg = AutoConfig.for_model(model_type, **fields)
    else:
        # A hub id is `name` or `owner/name`; anything else is a path, and a missing one must not go to the hub.
        looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1
        if looks_like_path and not Path(spec).expanduser().is_dir():
            raise ConfigError(f"{what}: {spec!r} is not a directory (relative paths start from {Path.cwd()})")
        try:
            cfg = AutoConfig.from_pretrained(Path(spec).expanduser() if spec.startswith("~") else spec)
        except OSError as err:
            raise ConfigError(f"{what}: cannot read a config from {spec!r} ({err}); the planner knows these hub ids "
                              f"offline: {', '.join(KNOWN_CONFIGS)}") from None
    if vision and hasattr(cfg, "vision_config"):  # a two-tower CLIP/SigLIP checkpoint: the vision half
        cfg = cfg.vision_config
    return cfg


def model_shape(mcfg: ModelConfig) -> VLMShape:
    """The VLM shape of a recipe's `model` section."""
    try:
        return VLMShape.from_configs(
            component_config(mcfg.llm, vision=False), component_config(mcfg.vision, vision=True), mcfg.projector,
            getattr(mcfg, "vision_feature_select_strategy", None), mcfg.vision_feature_layer)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model: {err}") from None
