"""One reader of component configs for the builder, the exporter, the data pipeline and the planner: inline
configs, local directories (two-tower checkpoints give their vision half), hub ids resolved offline for the planner."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from pretrain.config import ConfigError
from pretrain.model.components import KNOWN_CONFIGS, load_component_config

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8}


def test_inline_and_local_two_tower_configs_give_the_vision_tower(tmp_path):
    inline = load_component_config({"model_type": "siglip_vision_model", **TOWER}, vision=True)
    assert inline.model_type == "siglip_vision_model" and inline.hidden_size == 32
    clip = AutoConfig.for_model("clip", vision_config={**TOWER, "hidden_size": 48})
    clip.save_pretrained(tmp_path / "clip")
    tower = load_component_config(str(tmp_path / "clip"), vision=True)
    assert tower.model_type == "clip_vision_model" and tower.hidden_size == 48  # the vision half, not the text one


def test_bad_specs_are_named_errors_and_never_reach_the_hub(tmp_path):
    with pytest.raises(ConfigError, match="model.vision: model_type 'llama' is not a supported vision tower"):
        load_component_config({"model_type": "llama", "hidden_size": 64}, vision=True)
    with pytest.raises(ConfigError, match="model.llm: an inline config needs a `model_type`"):
        load_component_config({"hidden_size": 64}, vision=False)
    with pytest.raises(ConfigError, match="is not a directory"):
        load_component_config(str(tmp_path / "missing" / "decoder"), vision=False, offline=True)


def test_offline_resolves_known_hub_ids_from_the_table():
    cfg = load_component_config("Qwen/Qwen2.5-0.5B", vision=False, offline=True)
    known = KNOWN_CONFIGS["Qwen/Qwen2.5-0.5B"]
    assert cfg.model_type == "qwen2" and cfg.hidden_size == known["hidden_size"] == 896
    assert cfg.num_key_value_heads == 2 and cfg.vocab_size == 151936
    tower = load_component_config("openai/clip-vit-large-patch14-336", vision=True, offline=True)
    assert tower.model_type == "clip_vision_model" and tower.image_size == 336
