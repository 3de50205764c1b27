"""Everything a training process builds before its first step: tokenizer, model, DeepSpeed engine, loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pretrain import distributed
from pretrain.config import Config, DataSource
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.sample import SampleProcessor
from pretrain.data.urls import expand_urls
from pretrain.model.attention import flex_row_widths, resolve_attention
from pretrain.model.build import ZeroContext, build_model
from pretrain.model.checkpointing import enable_activation_checkpointing
from pretrain.model.frozen import frozen_tower_for, persist_frozen_decoder
from pretrain.model.lora import adapted_components
from pretrain.model.processing import build_processing, run_tokenizer
from pretrain.model.sequence_parallel import SequenceParallel, register_ulysses
from pretrain.model.stages import apply_stage, param_groups
from pretrain.model.vlm import VLMForTraining
from pretrain.train.ds_config import optimizer_offloaded
from pretrain.train.schedule import lr_lambda

log = logging.getLogger(__name__)
# The validation loader decodes in one worker process, not in the training process while the accelerator idles.
# One worker reads the same samples in the same order as none (its shard slots are the rank's).
VAL_WORKERS = 1


@dataclass
class TrainingSetup:
    """What `build_engine` returns: the engine, the run's sample processing and the trainable parameter counts."""

    engine: Any
    tokenizer: PreTrainedTokenizerBase
    processor: SampleProcessor
    image_processor: Any
    trainable: dict[str, int]


def make_optimizer(groups: list[dict], cfg: Config, offloaded: bool) -> torch.optim.Optimizer:
    """torch AdamW; DeepSpeed's CPU Adam (same update rule, a C++ kernel compiled on first use) when ZeRO keeps the
    optimizer state on CPU/NVMe, where DeepSpeed refuses other optimizers."""
    t = cfg.train
    if offloaded:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
                             fused=torch.cuda.is_available())


def host_dtype(cfg: Config) -> torch.dtype:
    """The dtype the model is built in on the host: the training precision. DeepSpeed keeps the fp32 master
    weights itself (its bf16 optimizer, ZeRO's fp32 partitions), so an fp32 build would only be cast down at
    engine start, after every rank had held a whole fp32 copy: ~2x the host memory at start-up under ZeRO 0-2."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def build_engine(cfg: Config, ds_config: dict) -> TrainingSetup:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    tokenizer = run_tokenizer(cfg)
    zero = ZeroContext(ds_config)
    # transformers enters zero.Init while this object is alive; keep it referenced for the whole build.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero.zero3 else None
    model = build_model(cfg.model, tokenizer, zero, dtype=host_dtype(cfg), seed=cfg.run.seed,
                        packing=cfg.data.packing)
    m = cfg.model
    enable_activation_checkpointing(model, m.activation_checkpointing, m.activation_checkpointing_every_k)
    trainable = apply_stage(model, cfg.train.stage, adapted_components(cfg.model.lora))
    # The wrapper holds the optional alignment heads: they need optimizer groups and ZeRO partitioning too.
    module = VLMForTraining(model, cfg.objectives, seed=cfg.run.seed)
    t = cfg.train
    groups = param_groups(module, t.lr, t.weight_decay, t.lr_multipliers)
    optimizer = make_optimizer(groups, cfg, optimizer_offloaded(ds_config))
    schedule = lr_lambda(t.schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    frozen = cfg.deepspeed.frozen_unpartitioned
    if frozen:
        persist_frozen_decoder(model, t.stage)
    mpu = sequence_parallel(cfg.deepspeed.sequence_parallel_size, t.micro_batch_size, model, module)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, mpu=mpu)
    del hf_ds
    module.frozen_tower = frozen_tower_for(model, t.stage, frozen)
    module.row_widths = row_widths(cfg)
    # Every image takes at least image_seq_length tokens of a row: a bound every rank knows without asking.
    module.pair_capacity = t.micro_batch_size * max(1, cfg.data.max_length // model.config.image_seq_length)
    # The same decode + preprocess + tokenize path that `pretrain shards verify` and the benches run.
    processing = build_processing(cfg, tokenizer, model.config)
    return TrainingSetup(engine, tokenizer, processing.processor, processing.image_processor, trainable)


def sequence_parallel(size: int, micro_batch: int, model: Any, module: VLMForTraining) -> Any:
    """With deepspeed.sequence_parallel_size `size` > 1: the groups, DeepSpeed's Ulysses attention in the decoder,
    the module's shard and vision group; returns DeepSpeed's mpu for deepspeed.initialize (None when off)."""
    if size == 1:
        return None
    mpu, group, sp_rank = distributed.init_sequence_parallel(size)
    module.sequence_parallel = SequenceParallel(group, sp_rank, size)
    register_ulysses(model.config.text_config, module.sequence_parallel, micro_batch)
    # The vision encoding splits its tiles and frames over the same group (pretrain.model.vision_split).
    module.vision_group = group
    return mpu


def cpus_for_rank(env: Mapping[str, str] | None = None) -> int:
    """The CPUs this rank may use: its affinity set, capped by Slurm's --cpus-per-task (one task per rank), shared
    by the local ranks when torchrun started them all with the same affinity."""
    env = os.environ if env is None else env
    cpus = len(os.sched_getaffinity(0))
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cpus = min(cpus, int(env["SLURM_CPUS_PER_TASK"]))
    if env.get("TORCHELASTIC_RUN_ID"):
        cpus //= max(int(env.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(cpus, 1)


def loader_workers(setting: int | str, env: Mapping[str, str] | None = None) -> int:
    """`data.num_workers`: a number, or `auto` = the rank's CPUs minus the main process (which runs the step)."""
    return cpus_for_rank(env) - 1 if setting == "auto" else int(setting)


def row_widths(cfg: Config) -> tuple[int, ...] | None:
    """The few row widths batches are padded to when the decoder runs flex_attention (compiled per shape); None for
    the other implementations. The same answer on every rank: it depends on the config and the machine only."""
    choice = resolve_attention(cfg.model.attn_implementation, half_precision=cfg.train.precision == "bf16",
                               packing=cfg.data.packing)
    return flex_row_widths(cfg.data.max_length) if choice.decoder == "flex_attention" else None


def make_loader(cfg: Config, sources: list[DataSource], processor: SampleProcessor, pad_id: int, rank: int,
                world: int, *, train: bool, state: dict | None = None) -> ResumableLoader:
    # The N ranks of a sequence-parallel group (consecutive ranks) read the same samples: data-parallel slots.
    n = cfg.deepspeed.sequence_parallel_size
    rank, world = rank // n, cfg.deepspeed.data_parallel_size(world)
    spec = LoaderSpec(
        sources=[expand_urls(s.urls) for s in sources], weights=[s.weight for s in sources], rank=rank,
        world_size=world, num_workers=loader_workers(cfg.data.num_workers) if train else VAL_WORKERS,
        seed=cfg.run.seed, shuffle=train,
        shuffle_buffer=cfg.data.shuffle_buffer, rows_per_batch=cfg.train.micro_batch_size,
        max_length=cfg.data.max_length, packing=cfg.data.packing, pad_id=pad_id, row_widths=row_widths(cfg),
        max_images_per_batch=cfg.data.max_images_per_batch,
        epoch_size=cfg.data.epoch_size if train else None, single_pass=not train,
        stream_timeout_s=cfg.data.stream_timeout_s, stream_retries=cfg.data.stream_retries)
    for i, urls in enumerate(spec.sources):
        if not urls:
            raise FileNotFoundError(f"data source {i} ({sources[i].urls!r}) matches no shards")
    return ResumableLoader(spec, processor, state)
