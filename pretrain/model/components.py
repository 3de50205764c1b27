"""A component's config (the decoder, the vision tower) from what `model.llm` / `model.vision` say: an inline config
(random init), a local directory or a hub id. The one reader: the model builder, the exporter, the data pipeline
and the planner all call load_component_config.

A planner must run on a laptop with no hub access, so with `offline=True` the hub ids of the shipped recipes (and a
few other well-known ones) resolve from the table below: the numbers are copied from each repository's config.json.
Any other hub id needs the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pretrain.config import ConfigError

VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
# Full two-tower checkpoints (openai/clip-*, google/siglip-*): the vision half is taken.
TWO_TOWER_TYPES = ("clip", "siglip")

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


def load_component_config(spec: str | dict[str, Any], *, vision: bool, offline: bool = False) -> PretrainedConfig:
    """A decoder or vision-tower config from an inline dict (`model_type` + fields), a local directory or a hub id;
    with `offline`, the hub ids of KNOWN_CONFIGS come from the table instead of the hub."""
    what = "model.vision" if vision else "model.llm"
    if offline and isinstance(spec, str) and spec in KNOWN_CONFIGS:
        spec = KNOWN_CONFIGS[spec]
    if isinstance(spec, dict):
        fields = dict(spec)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"{what}: an inline config needs a `model_type`")
        cfg = AutoConfig.for_model(model_type, **fields)
    else:
        cfg = _from_directory_or_hub(spec, what, offline)
    if vision and cfg.model_type in TWO_TOWER_TYPES:
        cfg = cfg.vision_config
    if vision and cfg.model_type not in VISION_TYPES:
        raise ConfigError(f"model.vision: model_type {cfg.model_type!r} is not a supported vision tower "
                          f"(valid: {', '.join(VISION_TYPES + TWO_TOWER_TYPES)})")
    return cfg


def _from_directory_or_hub(spec: str, what: str, offline: bool) -> PretrainedConfig:
    # A hub id is `name` or `owner/name`; anything else is a path, and a missing one must not go to the hub.
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1
    if looks_like_path and not Path(spec).expanduser().is_dir():
        raise ConfigError(f"{what}: {spec!r} is not a directory (relative paths start from {Path.cwd()})")
    try:
        return AutoConfig.from_pretrained(Path(spec).expanduser() if spec.startswith("~") else spec)
    except OSError as err:
        known = f"; these hub ids resolve offline: {', '.join(KNOWN_CONFIGS)}" if offline else ""
        raise ConfigError(f"{what}: cannot read a config from {spec!r} ({err}){known}") from None
