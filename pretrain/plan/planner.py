"""`pretrain plan`: what a recipe costs on N GPUs, from the FLOPs model and the ZeRO memory/communication model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pretrain.config import Config, ConfigError, DeepSpeedConfig
from pretrain.data.anyres import grid_pinpoints, largest_grid_cost
from pretrain.model.flops import ParamCounts, StepFlops, count_params
from pretrain.plan.estimate import GIB, GPUS, Cluster, GPUSpec, Memory, StepEstimate, estimate_step, memory_per_gpu
from pretrain.plan.lengths import SampleCost, shard_samples
from pretrain.plan.lora import lora_counts
from pretrain.plan.shapes import model_shape
from pretrain.plan.workload import Workload

SCALE = tuple(2**k for k in range(3, 13))  # 8 ... 4096 GPUs
# Text tokens per sample when not given: a short caption for alignment, a conversation for instruction tuning.
DEFAULT_TEXT_TOKENS = {"align": 64, "finetune": 256, "full": 256}
VARLEN_ATTENTION = ("flash_attention_2", "flex_attention")  # kernels that skip the pairs across samples and padding


@dataclass(frozen=True)
class Plan:
    gpu: GPUSpec
    n_gpus: int
    tokens: float
    work: Workload
    cluster: Cluster
    ds: DeepSpeedConfig
    params: ParamCounts
    sample_flops: StepFlops  # one sample, forward + backward
    by_stage: dict[int, Memory]  # ZeRO stage -> memory per GPU at n_gpus
    scaling: list[tuple[int, StepEstimate | None]]  # cluster size -> estimate (None: global batch does not split)
    lengths: str = "assumed: uniform samples"  # where the sample lengths come from
    calibrated: dict[str, Any] | None = None  # the prediction from measured runs (pretrain.plan.calibrate)

    def as_dict(self) -> dict[str, Any]:
        w = self.work
        return {
            "gpu": asdict(self.gpu) | {"peak_flops": self.gpu.peak_flops}, "n_gpus": self.n_gpus,
            "tokens": self.tokens, "mfu": self.cluster.mfu, "mfu_source": self.cluster.mfu_source,
            "lengths": self.lengths,
            "batch": asdict(w.batch()) | {"padding_waste": w.batch().padding_waste,
                                          "text_only_fraction": w.batch().text_only_fraction},
            "assumptions": {k: v for k, v in asdict(self.cluster).items() if k != "gpu"},
            "stage": w.stage, "zero_stage": self.ds.zero_stage, "offload_optimizer": self.ds.offload_optimizer,
            "offload_params": self.ds.offload_params,
            "workload": {f.name: getattr(w, f.name) for f in fields(w) if f.name not in ("shape", "samples", "lora")}
            | {"lora": asdict(w.lora), "samples_per_row": w.samples_per_row, "row_tokens": w.row_tokens,
               "image_tokens": w.shape.image_tokens},
            "params": {**asdict(self.params), "total": self.params.total,
                       "trainable": self.params.trainable(w.stage)},
            "flops_per_sample": self.sample_flops.as_dict(),
            "memory_gib_by_zero_stage": {str(s): m.as_gib() for s, m in self.by_stage.items()},
            "scaling": [{"n_gpus": n, "feasible": e is not None,
                         **({} if e is None else e.as_dict() | {"hours": e.hours_for(self.tokens),
                                                                "effective_mfu": e.effective_mfu(self.gpu.peak_flops),
                                                                "fits": e.memory.total <= self.gpu.memory_bytes})}
                        for n, e in self.scaling],
        } | ({} if self.calibrated is None else {"calibrated": self.calibrated})


def workload(cfg: Config, *, seq_len: int | None = None, sample_len: int | None = None,
             text_tokens: int | None = None, images_per_sample: int = 1, logit_tokens: int | None = None,
             micro_batch: int | None = None, chunked_ce: bool = True, clips_per_sample: int | None = None,
             samples: list[SampleCost] | None = None) -> Workload:
    """The per-GPU work of a recipe; lengths the config does not fix default to a typical sample of its stage.
    A clip is priced at data.video_frames frames, each a tower pass and its pooled tokens (`clips_per_sample`, None:
    one in a video run, none otherwise)."""
    shape = model_shape(cfg.model)
    image, tower_passes = shape.image_tokens * images_per_sample, images_per_sample
    if cfg.model.image_tiling == "anyres":  # priced at the largest grid: each image's tiles all go through the tower
        vis = shape.vision
        pinpoints = grid_pinpoints(cfg.model.image_grid_pinpoints, vis.image_size, cfg.model.max_image_tiles)
        tiles, tokens = largest_grid_cost(pinpoints, vis.image_size, vis.patch_size, shape.image_tokens)
        image, tower_passes = tokens * images_per_sample, tiles * images_per_sample
    clips = clips_per_sample if clips_per_sample is not None else int(cfg.data.video_frames > 0)
    if clips:
        frames = cfg.data.video_frames * clips
        side = shape.vision.image_size // shape.vision.patch_size
        image, tower_passes = image + frames * (side * side // 4), tower_passes + frames  # stride-2 pooled frames
    seq = seq_len or cfg.data.max_length
    text = text_tokens if text_tokens is not None else DEFAULT_TEXT_TOKENS[cfg.train.stage]
    sample = sample_len or min(seq, image + text)
    if sample > seq:
        raise ConfigError(f"a sample of {sample} tokens does not fit rows of {seq} (data.max_length / --seq-len)")
    return Workload(
        shape=shape, stage=cfg.train.stage, seq_len=seq, sample_len=sample, images_per_sample=tower_passes,
        decoder_image_tokens=image,
        logit_tokens=logit_tokens if logit_tokens is not None else max(1, sample - image),
        packing=cfg.data.packing, micro_batch=micro_batch or cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum, global_batch=cfg.train.global_batch_size, precision=cfg.train.precision,
        checkpointing=cfg.model.activation_checkpointing,
        checkpointing_every_k=cfg.model.activation_checkpointing_every_k, chunked_ce=chunked_ce,
        samples=None if samples is None else tuple(samples),
        dense_attention=cfg.model.attn_implementation not in VARLEN_ATTENTION,
        lora=lora_counts(shape, cfg.model.lora, cfg.train.stage),
        sequence_parallel=cfg.deepspeed.sequence_parallel_size)


def data_samples(cfg: Config, limit: int) -> tuple[list[SampleCost] | None, str]:
    """The recipe's sample lengths from its shards, or None and why not (the planner then assumes uniform
    samples)."""
    if limit <= 0:
        return None, "not read (--length-samples 0)"
    try:
        samples = shard_samples(cfg, limit)
    except (ConfigError, OSError, ValueError) as err:
        return None, f"not read ({err})"
    return samples, f"{len(samples)} samples from the shards of data.train"


def stage_variant(ds: DeepSpeedConfig, stage: int) -> DeepSpeedConfig:
    """The same DeepSpeed settings at another ZeRO stage, dropping offloads that stage cannot do."""
    return ds.model_copy(update={
        "zero_stage": stage,
        "offload_optimizer": ds.offload_optimizer if stage >= 1 else "none",
        "offload_params": ds.offload_params if stage == 3 else "none",
    })


def make_plan(cfg: Config, n_gpus: int = 8, gpu: str = "h100", tokens: float = 1e9, mfu: float = 0.4,
              zero_stage: int | None = None, scale: tuple[int, ...] = SCALE, cluster: Cluster | None = None,
              lengths: str = "assumed: uniform samples", **work_kw: Any) -> Plan:
    """Memory by ZeRO stage at `n_gpus`, and step time / comm / time-to-T-tokens for every size in `scale`."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r} (valid: {', '.join(GPUS)})")
    if n_gpus < 1 or (cluster is None and not 0 < mfu <= 1):
        raise ConfigError("--gpus must be >= 1 and --mfu in (0, 1]")
    cluster = cluster or Cluster(GPUS[gpu], mfu=mfu)
    ds = cfg.deepspeed if zero_stage is None else stage_variant(cfg.deepspeed, zero_stage)
    work = workload(cfg, **work_kw)
    sizes = sorted(set(scale) | {n_gpus})
    return Plan(
        gpu=cluster.gpu, n_gpus=n_gpus, tokens=tokens, work=work, cluster=cluster, ds=ds,
        params=count_params(work.shape),
        sample_flops=_one_sample_flops(work),
        by_stage={s: memory_per_gpu(work, stage_variant(ds, s), n_gpus, cluster.overhead_gib) for s in range(4)},
        scaling=[(n, estimate_step(work, ds, n, cluster)) for n in sizes], lengths=lengths,
    )


def _one_sample_flops(work: Workload) -> StepFlops:
    return replace(work, micro_batch=1, packing=False).micro_flops()


def config_world_size(cfg: Config) -> int | None:
    """The world size a recipe's fixed global batch implies at its micro-batch and accumulation, if any: its
    data-parallel ranks, each a sequence-parallel group of deepspeed.sequence_parallel_size."""
    t = cfg.train
    per_rank = t.micro_batch_size * t.grad_accum
    if t.global_batch_size is None or t.global_batch_size % per_rank:
        return None
    return t.global_batch_size // per_rank * cfg.deepspeed.sequence_parallel_size


def calibrated_plan(cfg: Config, run_dirs: list[str], gpu: str = "h100", n_gpus: int | None = None,
                    tokens: float = 1e9, length_samples: int = 512, scale: tuple[int, ...] = SCALE,
                    quantile: float = 0.5, **work_kw: Any) -> Plan:
    """The plan of `cfg` with the hardware coefficients fitted to the runs in `run_dirs` (pretrain.plan.calibrate);
    `calibrated` holds the prediction at the recipe's world size: `n_gpus`, else what its global batch implies,
    else the runs' own. Each run contributes the `quantile` of its step times."""
    from pretrain.plan.calibrate import (
        as_dict,
        fit_memory_overhead,
        fit_step_time,
        modelled_memory_gib,
        read_run,
        step_features,
    )

    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r} (valid: {', '.join(GPUS)})")
    runs = [read_run(d) for d in run_dirs]
    if not 0 <= quantile <= 1:
        raise ConfigError(f"--step-quantile {quantile}: must be in [0, 1]")
    seconds, model_mem, measured_mem, features = [], [], [], []
    for run in runs:
        samples, _ = data_samples(run.cfg, length_samples)
        work = workload(run.cfg, samples=samples)
        f = step_features(work, run.cfg, run.world_size)
        features.append(f)
        seconds.append(run.step_time_s(quantile))
        if run.peak_memory_gib is not None:
            model_mem.append(modelled_memory_gib(work, run.cfg, run.world_size))
            measured_mem.append(run.peak_memory_gib)
    fit = fit_step_time(features, seconds)
    overhead = fit_memory_overhead(model_mem, measured_mem) if measured_mem else None
    spec = GPUS[gpu]
    cluster = Cluster(spec, mfu=fit.flops_per_s / spec.peak_flops,
                      mfu_source=f"calibrated on {len(runs)} run(s): {fit.flops_per_s / 1e12:.3g} TFLOP/s achieved",
                      flops_per_s=fit.flops_per_s, call_s=fit.call_s, fixed_step_s=fit.fixed_step_s,
                      calibrated=True, overhead_gib=overhead or 0.0)
    worlds = {run.world_size for run in runs}
    world = n_gpus or config_world_size(cfg) or (worlds.pop() if len(worlds) == 1 else 1)
    samples, lengths = data_samples(cfg, length_samples)
    plan = make_plan(cfg, world, gpu, tokens, zero_stage=None, scale=scale, cluster=cluster, lengths=lengths,
                     samples=samples, **work_kw)
    est = dict(plan.scaling)[world]
    if est is None:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} does not split over {world} ranks")
    result: dict[str, Any] = {
        "world_size": world, "step_quantile": quantile, "step_time_s": est.step_s,
        "tokens_per_s": est.tokens_per_step / est.step_s, "coefficients": as_dict(fit, overhead),
        "runs": [{"run_dir": str(run.run_dir), "world_size": run.world_size,
                  "measured_step_s": run.step_time_s(quantile), "fitted_step_s": fit.predict(f),
                  "measured_peak_memory_gib": run.peak_memory_gib}
                 for run, f in zip(runs, features, strict=True)],
    }
    if overhead is not None:
        result["peak_memory_gib"] = est.memory.total / GIB
    return replace(plan, calibrated=result)
