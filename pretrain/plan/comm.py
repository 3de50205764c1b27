"""Communication of one optimizer step: bytes per collective and the compute each can hide behind, the number of
collective calls (ZeRO-3 gathers one module's weights per call), and the host work of offloading."""

from __future__ import annotations

import math

from pretrain.config import DeepSpeedConfig
from pretrain.model.flops import VLMShape, count_params, trainable_components
from pretrain.plan.workload import Workload

DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size (elements)


def comm_per_step(work: Workload, ds: DeepSpeedConfig, n: int, accum: int, compute_s: float,
                  backward_s: float) -> list[tuple[float, float]]:
    """(bytes sent per GPU, seconds of compute it can hide behind) for each collective of one optimizer step.

    Ring collectives send (N-1)/N of the buffer per GPU. Stage 0/1 reduce gradients once, in the last micro-step's
    backward; stage 2 reduce-scatters in every micro-step's backward; stages 1/2 all-gather updated weights after the
    optimizer step (nothing to hide behind); stage 3 gathers weights for forward and backward and reduce-scatters
    gradients in every micro-step, prefetched behind compute.
    """
    if n <= 1:
        return []
    counts = count_params(work.shape)
    trainable, trained = work.trained_params(counts), trainable_components(work.stage)
    pb = gb = 2 if work.precision == "bf16" else 4
    ring = (n - 1) / n
    grads = trainable * gb * ring
    if ds.zero_stage == 0:
        return [(2 * grads, backward_s / accum)]
    if ds.zero_stage == 1:
        return [(grads, backward_s / accum), (trainable * pb * ring, 0.0)]
    if ds.zero_stage == 2:
        return [(grads * accum, backward_s), (trainable * pb * ring, 0.0)]
    # Backward regathers every part gradients flow through: the decoder and projector always, the vision tower
    # only when it trains (nothing upstream of it does).
    backward_params = counts.llm + counts.projector + (counts.vision if "vision" in trained else 0)
    per_micro = (counts.total + backward_params) * pb * ring + grads
    return [(per_micro * accum, compute_s)]


def offload_seconds(work: Workload, ds: DeepSpeedConfig, n: int, pcie_Bps: float, cpu_adam_params_per_s: float
                    ) -> float:
    """Host-side optimizer step and the PCIe copies around it (not overlapped: a conservative bound)."""
    counts = count_params(work.shape)
    pb = 2 if work.precision == "bf16" else 4
    seconds = 0.0
    if ds.offload_optimizer != "none" and ds.zero_stage >= 1:
        shard = work.trained_params(counts) / n
        seconds += shard * 2 * pb / pcie_Bps  # gradients down, updated weights up
        seconds += shard / cpu_adam_params_per_s
    if ds.offload_params != "none" and ds.zero_stage == 3:
        # Each rank fetches its weight shard from the host before every gather (forward and backward).
        seconds += 2 * counts.total / n * pb * work.grad_accum / pcie_Bps
    return seconds


def collective_calls(work: Workload, ds: DeepSpeedConfig, n: int) -> float:
    """Collective calls of one optimizer step on one rank, each paying a latency whatever its size.

    ZeRO-3 gathers a module's weights at each call of it: in forward, in backward for every module gradients flow
    through, and again in the re-forward of a checkpointed layer; a frozen tower kept as a replica is never gathered
    (pretrain.model.frozen), a frozen decoder (align) once per step. Gradients leave in reduce_bucket_size buckets:
    every micro-step at stages 2-3, once per step at 0-1; stages 1-2 all-gather the updated weights once.
    """
    trained = trainable_components(work.stage)
    trainable = work.trained_params(count_params(work.shape))
    buckets = math.ceil(trainable / ds.reduce_bucket_size)
    if ds.zero_stage < 3:
        return buckets * (work.grad_accum if ds.zero_stage == 2 else 1) + buckets * (ds.zero_stage in (1, 2))
    ckpt = work.checkpointed_layers(work.shape.llm.layers) / work.shape.llm.layers
    per_micro = per_step = 0.0
    for part, (n_modules, n_layer_modules) in _modules_by_part(work.shape, ds.param_persistence_threshold).items():
        trains = part in trained
        if not trains and ds.frozen_unpartitioned:
            per_step += n_modules if part == "llm" else 0  # the tower's replica is never gathered
            continue
        backward = trains or part == "llm"  # gradients reach the image tokens through a frozen decoder
        recompute = ckpt * n_layer_modules if part == "llm" or trains else 0.0
        per_micro += n_modules * (1 + backward) + recompute
    return (per_micro + buckets) * work.grad_accum + per_step


def _modules_by_part(shape: VLMShape, persistence_threshold: int) -> dict[str, tuple[int, int]]:
    """(modules holding a partitioned weight, those inside a transformer layer) per part: the units ZeRO-3
    gathers. Tensors under `persistence_threshold` elements stay whole on every rank and need no gather."""
    modules: dict[str, set[str]] = {"vision": set(), "projector": set(), "llm": set()}
    for name, numel in shape.tensors():
        if numel >= persistence_threshold:
            modules[name.split(".", 1)[0]].add(name.rsplit(".", 1)[0])
    return {part: (len(names), sum(".layers." in m for m in names)) for part, names in modules.items()}


def sub_group_size(ds: DeepSpeedConfig) -> int:
    """zero_optimization.sub_group_size as the run's DeepSpeed config has it (deepspeed.overrides), else the
    default."""
    value = ds.overrides.get("zero_optimization.sub_group_size",
                             ds.overrides.get("zero_optimization", {}).get("sub_group_size"))
    return int(value) if value is not None else DEEPSPEED_SUB_GROUP_SIZE
