"""Resume with a changed config: the keys that change what is trained are compared with the checkpoint's own
config and listed; the run stops unless `checkpoint.allow_config_change` says to go on. The run's config.yaml keeps
its history: a different config never overwrites the one earlier steps were trained with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, ConfigError, save_config, to_yaml

log = logging.getLogger(__name__)

# What was trained: the model, the training data and its rendering, the optimizer, the schedule, precision, stage,
# objectives. Not listed (they pass silently): logging, max_steps / stop_at_step, validation, checkpointing,
# batch shape and ZeRO stage (resume on another world size handles those), loader workers, DeepSpeed tuning.
TRAINED = ("model", "data.train", "data.max_length", "data.packing", "data.chat_template", "train.stage",
           "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.schedule", "train.weight_decay",
           "train.betas", "train.grad_clip", "train.lr_multipliers", "train.precision", "objectives")


def _at(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def trained_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every trained key that differs (both trees as config.yaml holds them)."""
    changes = []
    for key in TRAINED:
        before, after = _flat(_at(old, key), key), _flat(_at(new, key), key)
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                changes.append(f"{name}: {before.get(name)!r} -> {after.get(name)!r}")
    return changes


def check_resume_config(cfg: Config, checkpoint: Path) -> list[str]:
    """Compare with the config the checkpoint was trained with; raises ConfigError on a change unless allowed."""
    saved = Path(checkpoint) / "config.yaml"
    if not saved.is_file():
        return []
    changes = trained_changes(yaml.safe_load(saved.read_text()) or {}, cfg.model_dump(mode="json"))
    if not changes:
        return []
    listing = "\n  ".join(changes)
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(f"resuming from {checkpoint} with a config that changes what was trained:\n  {listing}\n"
                          "Set checkpoint.allow_config_change=true to resume with it anyway, or use another "
                          "run.output_dir (or checkpoint.resume=none) to start afresh.")
    log.warning("resuming from %s with a changed config (checkpoint.allow_config_change=true):\n  %s", checkpoint,
                listing)
    return changes


def write_run_config(cfg: Config, run_dir: Path) -> Path:
    """RUN_DIR/config.yaml = this invocation's config; an earlier, different one is kept as config.<n>.yaml."""
    path = Path(run_dir) / "config.yaml"
    if path.is_file() and path.read_text() != to_yaml(cfg):
        n = 1
        while (path.parent / f"config.{n}.yaml").exists():
            n += 1
        path.replace(path.parent / f"config.{n}.yaml")
        log.info("the run's earlier config.yaml is kept as config.%d.yaml", n)
    save_config(cfg, path)
    return path
