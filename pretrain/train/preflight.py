"""What must hold before a run starts, checked without loading a model: the trainer runs it first, and
`pretrain submit` runs the same before it writes or queues anything, so a job that cannot start never waits in a
queue. Every problem is listed at once, each naming its key and, where there is one, the fix."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import Config, ConfigError
from pretrain.data.urls import expand_urls, missing_shards
from pretrain.model.components import load_component_config
from pretrain.model.sequence_parallel import check_heads
from pretrain.train import checkpoint as ckpt


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative with ./ ~, or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _model_problems(cfg: Config) -> list[str]:
    m = cfg.model
    problems = []
    for key in ("llm", "vision", "tokenizer", "init_from", "projector_from"):
        value = getattr(m, key)
        if isinstance(value, str) and _looks_local(value) and not Path(value).expanduser().exists():
            hint = " (the `pretrain convert` output of the previous stage)" if key == "init_from" else ""
            problems.append(f"model.{key}: {value} does not exist{hint}")
    return problems + _sequence_parallel_problems(cfg)


def _sequence_parallel_problems(cfg: Config) -> list[str]:
    """Ulysses splits the decoder's attention heads over the group: the decoder's config must allow N."""
    size = cfg.deepspeed.sequence_parallel_size
    if size == 1:
        return []
    try:
        text = load_component_config(cfg.model.llm, vision=False, offline=True)
    except (ConfigError, OSError):  # unreadable here (a hub id offline): the engine set-up checks it at start
        return []
    try:
        check_heads(size, text.num_attention_heads, getattr(text, "num_key_value_heads", None)
                    or text.num_attention_heads)
    except ConfigError as err:
        return [str(err)]
    return []


def _data_problems(cfg: Config) -> list[str]:
    problems = []
    for section, sources in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        for i, source in enumerate(sources):
            try:
                urls = expand_urls(source.urls)
            except FileNotFoundError as err:  # a glob matching nothing, a missing shard directory
                problems.append(f"{section}.{i}.urls: {err} (build them with `pretrain shards ...`)")
                continue
            missing = missing_shards(urls)
            if not urls or missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                problems.append(f"{section}.{i}.urls: {len(missing)} of {len(urls)} shards missing: "
                                f"{shown or source.urls} (build them with `pretrain shards ...`)")
    template = cfg.data.chat_template
    if template.endswith(".jinja") and not Path(template).expanduser().is_file():
        problems.append(f"data.chat_template: {template} does not exist")
    return problems


def problems(cfg: Config, world_size: int) -> list[str]:
    """Everything that would stop the run at start on `world_size` ranks."""
    found = _model_problems(cfg) + _data_problems(cfg)
    ds_file = cfg.deepspeed.config_file
    if ds_file and not Path(ds_file).is_file():
        found.append(f"deepspeed.config_file: {ds_file} does not exist")
    if cfg.checkpoint.resume not in ("auto", "none"):
        try:
            ckpt.resolve_checkpoint(cfg.checkpoint.resume, cfg.run.output_dir)
        except FileNotFoundError as err:
            found.append(f"checkpoint.resume: {err}")
    try:
        cfg.check_world_size(world_size)
    except ConfigError as err:
        found.append(str(err))
    return found


def preflight(cfg: Config, world_size: int) -> None:
    """Raise one ConfigError listing every problem (exit 2 from the command line)."""
    found = problems(cfg, world_size)
    if found:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(found))
