"""The model shape a recipe describes, without downloading anything (hub ids of well-known models resolve offline:
pretrain.model.components.KNOWN_CONFIGS)."""

from __future__ import annotations

from pretrain.config import ConfigError, ModelConfig
from pretrain.model.components import load_component_config
from pretrain.model.flops import VLMShape


def model_shape(mcfg: ModelConfig) -> VLMShape:
    """The VLM shape of a recipe's `model` section."""
    try:
        return VLMShape.from_configs(
            load_component_config(mcfg.llm, vision=False, offline=True),
            load_component_config(mcfg.vision, vision=True, offline=True), mcfg.projector,
            getattr(mcfg, "vision_feature_select_strategy", None), mcfg.vision_feature_layer)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model: {err}") from None
