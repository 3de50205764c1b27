"""Typed run configuration: YAML recipe + `key.sub=value` overrides, validated by pydantic.

Every section forbids unknown keys, so a typo is an error that names the key and lists the valid ones.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pretrain.atomic_file import write_atomic


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what would be valid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    output_dir: str = "runs/default"
    name: str = "run"
    seed: int = 0
    # Where rank 0 logs besides metrics.jsonl, each configured by the tool's own environment variables (WANDB_*,
    # MLFLOW_*); see pretrain/train/trackers.py. An empty list logs to metrics.jsonl only.
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])


class LoraConfig(Section):
    """LoRA / QLoRA adapters, built with PEFT (pretrain/model/lora.py). r = 0: off."""

    r: int = Field(default=0, ge=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # Module names (PEFT's matching: a name or the end of a dotted path) in the decoder; None = every linear layer
    # of the decoder but the LM head, as LLaVA's find_all_linear_names. The projector trains in full.
    target_modules: list[str] | None = None
    # Adapters on the vision tower's linears too, its base frozen (train.stage=full only).
    vision: bool = False
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)
    dora: bool = False  # weight-decomposed LoRA (PEFT's use_dora)
    # nf4: the decoder's frozen base in 4 bits (bitsandbytes, CUDA only): QLoRA.
    quantize: Literal["none", "nf4"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _some_module(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and not names:
            raise ValueError("an empty list adapts nothing; leave it unset for every linear layer of the decoder")
        return names

    @property
    def enabled(self) -> bool:
        return self.r > 0


class ModelConfig(Section):
    """See pretrain/model/*.py for the why of each choice."""

    # A hub id, a local directory, or an inline config (a dict with `model_type`) for random init.
    llm: str | dict[str, Any]
    vision: str | dict[str, Any]
    # mlp2x_gelu (LLaVA-1.5) or linear (one trained layer); both export as plain LlavaForConditionalGeneration.
    # mlp3x_gelu is refused: transformers' Llava projector has two layers, so it could not be exported.
    projector: Literal["mlp2x_gelu", "linear", "mlp3x_gelu"] = "mlp2x_gelu"
    # Tokenizer location; defaults to `llm` when that is a hub id or a directory.
    tokenizer: str | None = None
    # A tower layer index, or several whose features are concatenated (the projector input widens accordingly).
    vision_feature_layer: int | list[int] = -2
    # None = the tower's convention: "default" (drop CLS) for CLIP, "full" for SigLIP (it has no CLS token).
    vision_feature_select_strategy: Literal["default", "full"] | None = None
    # For the decoder (the tower runs sdpa unless eager / flash_attention_2); auto = flash_attention_2 on CUDA in
    # bf16 when flash-attn is installed, else sdpa.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    # Non-reentrant, for the decoder and the vision tower: every layer, or layers 0, k, 2k, ... of each.
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    activation_checkpointing_every_k: int = Field(default=2, ge=1)
    # An exported Hugging Face directory (ours or a public LLaVA-format model) to start from. It defines the
    # architecture: llm / vision are not loaded, and projector / vision_feature_* must agree if set explicitly.
    init_from: str | None = None
    # Only the projector from a file (safetensors / .bin, e.g. LLaVA's stage-1 mm_projector.bin) or an export
    # directory, loaded after everything else (so it also overrides init_from's projector).
    projector_from: str | None = None
    # How an image becomes tiles: none = one tile at the tower's size (a Llava model); anyres = LLaVA-NeXT's
    # best-fit grid of tower-size tiles plus a base thumbnail, unpadded, with a learned newline per row (a
    # LlavaNext model; see pretrain/data/anyres.py).
    image_tiling: Literal["none", "anyres"] = "none"
    # anyres: the [height, width] resolutions the best fit chooses from; None = every grid of 1..3 x 1..3 tiles of
    # the tower's size (as far as model.max_image_tiles allows).
    image_grid_pinpoints: list[list[int]] | None = None
    # Most tiles one sample may bring (all its images, base thumbnails included; more is skipped and counted as
    # too_many_image_tiles); None = no cap. anyres grids needing more than this are left out of the default
    # pinpoints.
    max_image_tiles: int | None = Field(default=None, ge=1)
    # LoRA adapters on the decoder (and optionally the tower) with their base weights frozen; see LoraConfig.
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("image_grid_pinpoints")
    @classmethod
    def _pinpoints(cls, pinpoints: list[list[int]] | None) -> list[list[int]] | None:
        if pinpoints is not None and (not pinpoints or any(len(p) != 2 or min(p) < 1 for p in pinpoints)):
            raise ValueError("a non-empty list of [height, width] pairs of positive sizes")
        return pinpoints

    @field_validator("projector")
    @classmethod
    def _exportable(cls, kind: str) -> str:
        if kind == "mlp3x_gelu":
            raise ValueError("mlp3x_gelu cannot be exported as transformers' LlavaForConditionalGeneration (its "
                             "projector has two layers): use mlp2x_gelu or linear")
        return kind

    @field_validator("vision_feature_layer")
    @classmethod
    def _some_layer(cls, layer: int | list[int]) -> int | list[int]:
        if isinstance(layer, list) and not layer:
            raise ValueError("an empty list selects no features")
        return layer


class DataSource(Section):
    urls: str | list[str]
    weight: float = Field(default=1.0, gt=0)


# Conversation formats `data.chat_template` may name (their templates: pretrain/data/chat_formats.py).
CHAT_FORMATS = ("vicuna_v1", "plain", "llama2", "mistral", "chatml")
CHAT_FORMAT_CHOICES = ("auto", *CHAT_FORMATS, "a path to a .jinja file")


class DataConfig(Section):
    train: list[DataSource] = Field(min_length=1)
    val: list[DataSource] = Field(default_factory=list)
    max_length: int = Field(default=2048, ge=16)
    packing: bool = False
    # Images (tiles, with AnyRes) per micro-batch: a batch ends before a sample that would pass it, so the vision
    # tower's work per rank is bounded; a sample alone over it is skipped (too_many_images). None: no limit.
    max_images_per_batch: int | None = Field(default=None, ge=1)
    # Loader worker processes per rank; `auto`: the CPUs given to the rank minus its main process (train.engine).
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 2
    shuffle_buffer: int = Field(default=1000, ge=1)
    # Samples per epoch for streams whose size is unknown (pipe:, http); None = read the manifests.
    epoch_size: int | None = Field(default=None, ge=1)
    # Streams (pipe:, http): an attempt that gets no byte for this long fails, and is retried this many times from
    # the byte reached (pretrain.data.remote); then the shard is lost and counted (unreadable_shard).
    stream_timeout_s: float = Field(default=60.0, gt=0)
    stream_retries: int = Field(default=3, ge=0)
    # A source whose skipped fraction passes this (after `bad_min_samples`) is a broken data set: stop the run.
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1)
    bad_min_samples: int = Field(default=200, ge=1)
    # Images larger than this many pixels are skipped as decompression bombs.
    max_image_pixels: int = Field(default=89_478_485, ge=1)
    fast_image_decode: bool = False
    # Video (shard samples with a clip, pretrain/data/video.py): frames taken per clip, spread uniformly over it
    # (fewer for a clip with fewer frames); each is one tile against max_images_per_batch. 0 = the run takes no
    # video (such samples are skipped and counted as video_off). Needs model.image_tiling=anyres: the model is
    # LlavaNextVideo, whose image path is LlavaNext's (pretrain/model/video.py).
    video_frames: int = Field(default=0, ge=0)
    # A sampling rate (frames per second of clip) instead of a fixed count, capped by video_frames; None = always
    # video_frames (a clip's count then does not depend on its length).
    video_fps: float | None = Field(default=None, gt=0)
    # Each rank appends the keys of the samples of every step to RUN_DIR/samples/rank<R>.jsonl (an audit trail).
    record_samples: bool = False
    # How conversations become text: `auto` (the tokenizer's own chat template), a format LLaVA-family checkpoints
    # were trained with (vicuna_v1, plain, llama2, mistral, chatml; pretrain/data/chat_formats.py), or a .jinja file.
    chat_template: str = "auto"

    @field_validator("chat_template")
    @classmethod
    def _known_format(cls, name: str) -> str:
        if name != "auto" and name not in CHAT_FORMATS and not name.endswith(".jinja"):
            raise ValueError(f"{name!r} is not a conversation format; valid: {', '.join(CHAT_FORMAT_CHOICES)}")
        return name


class TrainConfig(Section):
    stage: Literal["align", "finetune", "full"] = "align"
    max_steps: int = Field(ge=1)
    # End this invocation at this step (checkpoint saved, schedule unchanged): time-sliced jobs, resume tests.
    stop_at_step: int | None = Field(default=None, ge=1)
    micro_batch_size: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    # If set, must equal micro_batch_size x grad_accum x data-parallel size (checked at launch).
    global_batch_size: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, ge=0)
    # Per-module learning-rate multipliers: keys `projector`, `llm`, `vision`.
    lr_multipliers: dict[Literal["projector", "llm", "vision"], float] = Field(default_factory=dict)
    precision: Literal["fp32", "bf16"] = "bf16"
    log_every: int = Field(default=10, ge=1)
    val_every: int = Field(default=0, ge=0)
    val_batches: int = Field(default=8, ge=1)
    # At each validation: this many val images captioned greedily by the training model (TensorBoard, val.jsonl).
    val_captions: int = Field(default=4, ge=0)
    val_caption_tokens: int = Field(default=24, ge=1)
    max_nonfinite_in_row: int = Field(default=5, ge=1)
    progress_bar: bool = True
    # A rank without progress this long ends the run (exit 76, restartable; pretrain.train.watchdog). Unset: derived
    # from the measured step and save times (10 x the slowest step, 3 x the slowest save, at least 5 minutes).
    hang_timeout_minutes: float | None = Field(default=None, gt=0)


class CheckpointConfig(Section):
    every_steps: int = Field(default=0, ge=0)
    # Also save once this many minutes of wall clock (rank 0's, agreed through the step's collective) have passed
    # since the start or the last save: what a crash can lose, whatever a step takes. 0: off.
    every_minutes: float = Field(default=30.0, ge=0)
    resume: str = "auto"  # auto | none | a checkpoint: a run directory, its checkpoints/latest, a tag directory
    # Resume although the model, data, optimizer, schedule, precision or stage changed (listed in the log).
    allow_config_change: bool = False
    keep_last: int = Field(default=3, ge=1)
    keep_every: int = Field(default=0, ge=0)
    # What a resume checks of a committed checkpoint: every listed file's size, or its size and CRC-32 (`crc`:
    # a flipped bit passes the checkpoint over for the previous one). Cost at 1B parameters: benchmarks/RESULTS.md.
    verify: Literal["sizes", "crc"] = "crc"


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    # A user's DeepSpeed JSON (e.g. LLaVA's zero3.json); our batch, precision and optimizer keys win over it.
    config_file: str | None = None
    overlap_comm: bool = True
    reduce_bucket_size: int = Field(default=50_000_000, ge=1)
    prefetch_bucket_size: int = Field(default=50_000_000, ge=1)
    param_persistence_threshold: int = Field(default=100_000, ge=0)
    max_live_parameters: int = Field(default=1_000_000_000, ge=1)
    # ZeRO-3 and frozen parts (pretrain.model.frozen): a frozen vision tower (align, finetune) runs as a whole
    # replica on every rank, a frozen decoder (align) is gathered once per optimizer step, not at every call.
    # false: partitioned and gathered at every call, as any trained module (the least memory).
    frozen_unpartitioned: bool = True
    # Extra raw DeepSpeed keys merged last (dotted keys allowed).
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Collective timeout (a hung rank fails the run after this long). Fractions of a minute are allowed.
    timeout_minutes: float = Field(default=30, gt=0)
    # How long the other ranks wait for rank-0-only work (checkpoint commit and pruning, the universal-checkpoint
    # conversion of a large model); they wait in the rendezvous store, not in a collective. A bound: a commit waits
    # 3 x the slowest save measured (at least 5 minutes) once one was, this long before.
    rank0_work_timeout_minutes: float = Field(default=120, gt=0)
    # Ulysses sequence parallelism (DeepSpeed's ALST): the ranks of a group of N split each sequence (and the
    # attention heads) between them; world size = data-parallel size x N. 1 = off.
    sequence_parallel_size: int = Field(default=1, ge=1)

    def data_parallel_size(self, world_size: int) -> int:
        """The ranks that read different data: `world_size` / sequence_parallel_size; a ConfigError naming the
        numbers when it does not divide."""
        n = self.sequence_parallel_size
        if world_size % n:
            raise ConfigError(f"deepspeed.sequence_parallel_size={n} does not divide the world size ({world_size} "
                              f"ranks): use a multiple of {n} ranks")
        return world_size // n


class ObjectivesConfig(Section):
    """Training objectives and their weights. The step loss is caption_weight x (mean token loss) + the weighted
    alignment losses (see pretrain.model.vlm). Contrastive and ITM use the samples that have exactly one image (a
    text after several images describes none of them alone); their text is what the sample is trained to produce
    (its label tokens)."""

    caption_weight: float = Field(default=1.0, ge=0)
    # Image-text contrastive (InfoNCE, negatives gathered across ranks) between pooled image and text features.
    contrastive_weight: float = Field(default=0.0, ge=0)
    # Image-text matching: a binary head on the decoder's fused representation, hard negatives from the similarities.
    itm_weight: float = Field(default=0.0, ge=0)
    temperature_init: float = Field(default=0.07, gt=0, le=1)
    learnable_temperature: bool = True
    # CLIP clamps the learned logit scale (1 / temperature) at 100 for stability.
    max_logit_scale: float = Field(default=100.0, gt=1)
    embed_dim: int = Field(default=256, ge=8)

    @property
    def alignment(self) -> bool:
        return self.contrastive_weight > 0 or self.itm_weight > 0


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    objectives: ObjectivesConfig = Field(default_factory=ObjectivesConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        _check_objectives(self)
        _check_lora(self)
        ds = self.deepspeed
        if ds.offload_params != "none" and ds.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params needs deepspeed.zero_stage=3 (got {ds.zero_stage})")
        if ds.offload_optimizer != "none" and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3 (got 0)")
        if ds.sequence_parallel_size > 1 and self.objectives.alignment:
            raise ValueError(f"deepspeed.sequence_parallel_size={ds.sequence_parallel_size} with the alignment "
                             "objectives (objectives.contrastive_weight / itm_weight) is not supported: they pool "
                             "whole sequences, which sequence parallelism splits over ranks")
        if "nvme" in (ds.offload_optimizer, ds.offload_params) and not ds.nvme_path:
            raise ValueError("deepspeed.nvme_path is required when offloading to nvme")
        if self.data.video_frames and self.model.image_tiling != "anyres":
            raise ValueError("data.video_frames > 0 needs model.image_tiling=anyres (video exports as LlavaNextVideo, "
                             "whose images are LlavaNext's AnyRes)")
        if self.data.video_fps is not None and not self.data.video_frames:
            raise ValueError("data.video_fps needs data.video_frames > 0 (the most frames a clip gives)")
        if self.train.val_every and not self.data.val:
            raise ValueError("train.val_every > 0 needs data.val sources")
        if self.train.stage == "align" and set(self.train.lr_multipliers) - {"projector"}:
            raise ValueError("train.lr_multipliers for llm/vision have no effect in train.stage=align "
                             "(only the projector trains); use stage finetune or full")
        if self.train.stage == "finetune" and "vision" in self.train.lr_multipliers:
            raise ValueError("train.lr_multipliers.vision needs train.stage=full (the tower is frozen in finetune)")
        return self

    def check_world_size(self, world_size: int) -> None:
        """Global batch = micro-batch x accumulation x data-parallel size, made explicit."""
        world_size = self.deepspeed.data_parallel_size(world_size)
        t = self.train
        got = t.micro_batch_size * t.grad_accum * world_size
        if t.global_batch_size is None or t.global_batch_size == got:
            return
        split = batch_split(t.global_batch_size, t.micro_batch_size, t.grad_accum, world_size)
        fix = (f"set train.micro_batch_size={split[0]} train.grad_accum={split[1]}" if split else
               f"{t.global_batch_size} rows do not split over {world_size} ranks: use a world size that divides "
               f"it or set train.global_batch_size to a multiple of {world_size}")
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} but train.micro_batch_size "
                          f"({t.micro_batch_size}) x train.grad_accum ({t.grad_accum}) x world size ({world_size}) = "
                          f"{got}; {fix} (or drop train.global_batch_size)")


def batch_split(global_batch: int | None, micro_batch: int, grad_accum: int, world_size: int
                ) -> tuple[int, int] | None:
    """(micro-batch, accumulation) that make `global_batch` on `world_size` ranks: the configured pair when it
    does, else the largest micro-batch up to the configured one that divides the rows per rank. None when the
    global batch does not split over the ranks. `pretrain plan` and the trainer's / submit's check share it."""
    if global_batch is None:
        return micro_batch, grad_accum
    per_rank, rest = divmod(global_batch, world_size)
    if per_rank < 1 or rest:
        return None
    if micro_batch * grad_accum == per_rank:
        return micro_batch, grad_accum
    micro = max(m for m in range(1, min(micro_batch, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def _check_objectives(cfg: Config) -> None:
    o = cfg.objectives
    if o.caption_weight + o.contrastive_weight + o.itm_weight == 0:
        raise ValueError("objectives: caption_weight, contrastive_weight and itm_weight are all 0: nothing to train")
    if o.itm_weight > 0 and cfg.train.micro_batch_size < 2 and not cfg.data.packing:
        raise ValueError("objectives.itm_weight > 0 draws hard negatives from the other images of a micro-batch: "
                         "it needs train.micro_batch_size >= 2 image samples")
    if o.alignment and cfg.model.image_tiling != "none":
        # Pairs pool one fixed-size token grid per image; AnyRes images have as many tokens as their size gives.
        raise ValueError("objectives contrastive/itm need model.image_tiling=none")


def _check_lora(cfg: Config) -> None:
    lora, stage = cfg.model.lora, cfg.train.stage
    if not lora.enabled:
        return
    if stage == "align":
        raise ValueError("model.lora.r > 0 with train.stage=align: nothing to adapt (align trains the projector "
                         "only, the decoder is frozen); use train.stage=finetune or full, or model.lora.r=0")
    if lora.vision and stage != "full":
        raise ValueError(f"model.lora.vision needs train.stage=full (the tower is frozen in {stage})")
    if lora.quantize != "none" and cfg.deepspeed.zero_stage == 3:
        raise ValueError("model.lora.quantize=nf4 with deepspeed.zero_stage=3 is not supported: 4-bit weights are "
                         "kept whole on every GPU (bitsandbytes), so use zero_stage 0, 1 or 2 for QLoRA")
    if lora.quantize != "none" and lora.vision:
        raise ValueError("model.lora.quantize=nf4 quantizes the decoder only; drop model.lora.vision")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. backticks): keep the text as a string; validation decides
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1])]
            continue
        if not isinstance(node.get(part, {}), dict | list):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is a value, not a section; cannot set {'.'.join(path)}")
        node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{'.'.join(path)}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _valid_keys_hint(e["loc"])
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _valid_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif isinstance(part, int) or part == "train" and model is DataConfig:
            model = DataSource
        else:
            return ""
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    return (f" (did you mean {close[0]!r}?" if close else " (") + " valid keys: " + ", ".join(valid) + ")"


def build_config(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    return build_config(tree)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, to_yaml(cfg))
