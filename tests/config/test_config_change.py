"""What counts as a change to what was trained, and the run's config.yaml history (never overwritten)."""

from __future__ import annotations

import pytest
import yaml
from helpers.runs import write_config

from pretrain.config import ConfigError, load_config, to_yaml
from pretrain.train.config_change import check_resume_config, trained_changes, write_run_config


def test_trained_keys_are_listed_and_the_rest_pass(tmp_path, assets, shapes):
    base = load_config(write_config(tmp_path / "c.yaml", assets, shapes))
    old = base.model_dump(mode="json")
    harmless = load_config(tmp_path / "c.yaml", ["train.max_steps=99", "train.log_every=5", "train.val_every=0",
                                                 "checkpoint.every_steps=7", "data.num_workers=3"])
    assert trained_changes(old, harmless.model_dump(mode="json")) == []
    changed = load_config(tmp_path / "c.yaml", ["train.betas=[0.9,0.95]", "train.lr=0.5", "train.stage=finetune",
                                                "data.chat_template=chatml", "model.projector=linear"])
    listed = trained_changes(old, changed.model_dump(mode="json"))
    assert [line.split(":")[0] for line in listed] == ["model.projector", "data.chat_template", "train.stage",
                                                       "train.lr", "train.betas"]
    assert "train.betas: [0.9, 0.999] -> [0.9, 0.95]" in listed


def test_a_change_stops_unless_allowed_and_history_keeps_every_config(tmp_path, assets, shapes, caplog):
    run = tmp_path / "run"
    first = load_config(write_config(tmp_path / "c.yaml", assets, shapes))
    write_run_config(first, run)
    tag = run / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    (tag / "config.yaml").write_text(to_yaml(first))
    other = load_config(tmp_path / "c.yaml", ["train.betas=[0.8,0.9]"])
    with pytest.raises(ConfigError, match="(?s)train.betas.*checkpoint.allow_config_change=true"):
        check_resume_config(other, tag)
    allowed = load_config(tmp_path / "c.yaml", ["train.betas=[0.8,0.9]", "checkpoint.allow_config_change=true"])
    with caplog.at_level("WARNING"):
        assert check_resume_config(allowed, tag) == ["train.betas: [0.9, 0.999] -> [0.8, 0.9]"]
    assert "train.betas" in caplog.text
    write_run_config(allowed, run)
    write_run_config(allowed, run)  # the same config again: no new history entry
    assert yaml.safe_load((run / "config.1.yaml").read_text())["train"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["betas"] == [0.8, 0.9]
    assert not (run / "config.2.yaml").exists()
    assert check_resume_config(first, tag) == []  # the same config resumes silently
