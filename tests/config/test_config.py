"""Config validation: each kind of error names the key and what would be valid; the shipped recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "model": {"llm": "some/llm", "vision": "some/vision"},
    "data": {"train": [{"urls": "x/shard-{000000..000003}.tar"}]},
    "train": {"max_steps": 10},
}


def _write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


@pytest.mark.parametrize("name", ["demo", "llava15_stage1", "llava15_stage2", "qwen25_siglip"])
def test_shipped_recipes_validate(name):
    """Every value the recipe sets is what the loaded config holds (nothing dropped, renamed or coerced away)."""
    tree = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    loaded = load_config(ROOT / "configs" / f"{name}.yaml").model_dump(mode="json")
    for key, want in _leaves(tree):
        got = loaded
        for part in key:
            got = got[part]
        assert got == want or (isinstance(want, list | tuple) and list(got) == list(want)), (key, got, want)


def _leaves(tree, prefix: tuple = ()):
    """(path, value) of every scalar or list in a YAML tree; lists of mappings are walked by index."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            yield from _leaves(v, (*prefix, i))
    else:
        yield prefix, tree


def test_llava_recipes_match_the_paper():
    s1 = load_config(ROOT / "configs" / "llava15_stage1.yaml")
    s2 = load_config(ROOT / "configs" / "llava15_stage2.yaml")
    assert (s1.train.stage, s1.train.lr, s1.train.global_batch_size) == ("align", 1e-3, 256)
    assert (s2.train.stage, s2.train.lr, s2.train.global_batch_size) == ("finetune", 2e-5, 128)
    assert s1.model.vision == "openai/clip-vit-large-patch14-336"
    s1.check_world_size(8)
    with pytest.raises(ConfigError, match="global_batch_size=256"):
        s1.check_world_size(4)


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["train.max_steps=7", "train.lr=0.5", "data.train.0.weight=2",
                                                  "deepspeed.zero_stage=2", "run.name=x; rm -rf ~"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.train[0].weight) == (7, 0.5, 2.0)
    assert cfg.deepspeed.zero_stage == 2 and cfg.run.name == "x; rm -rf ~"


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, MINIMAL), ["train.max_step=7"])
    msg = str(e.value)
    assert "train.max_step" in msg and "unknown key" in msg and "did you mean 'max_steps'" in msg
    assert "valid keys:" in msg and "micro_batch_size" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="trian: unknown key.*did you mean 'train'"):
        load_config(_write(tmp_path, {**MINIMAL, "trian": {}}))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*integer"):
        load_config(_write(tmp_path, MINIMAL), ["train.max_steps=ten"])


def test_out_of_range_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: Input should be 0, 1, 2 or 3"):
        load_config(_write(tmp_path, MINIMAL), ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"train\.stage: Input should be 'align', 'finetune' or 'full'"):
        load_config(_write(tmp_path, MINIMAL), ["train.stage=pretrain"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: Input should be greater than or equal to 1"):
        load_config(_write(tmp_path, MINIMAL), ["train.max_steps=0"])


def test_missing_required_key(tmp_path):
    tree = {k: v for k, v in MINIMAL.items() if k != "train"}
    with pytest.raises(ConfigError, match="train: required key is missing"):
        load_config(_write(tmp_path, tree))


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.offload_params=cpu", "deepspeed.zero_stage=2"], "offload_params needs deepspeed.zero_stage=3"),
    (["deepspeed.offload_optimizer=nvme"], "nvme_path is required"),
    (["train.val_every=5"], "val_every > 0 needs data.val"),
    (["train.lr_multipliers.llm=2"], "have no effect in train.stage=align"),
])
def test_impossible_combinations(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, MINIMAL), overrides)


def test_bad_override_syntax_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(_write(tmp_path, MINIMAL), ["train.max_steps"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(_write(tmp_path, MINIMAL), ["data.train.3.weight=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["train.betas=[0.9, 0.95]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = Config.model_validate(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert again == cfg and again.train.betas == (0.9, 0.95)
