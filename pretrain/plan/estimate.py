"""Per-GPU memory, step time and communication of a recipe on a data-parallel ZeRO cluster.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", sections 3 and 5): for Psi parameters, mixed-precision Adam holds 2*Psi bytes of bf16 weights,
2*Psi of gradients and K*Psi of optimizer state with K = 12 (fp32 master copy + two fp32 moments). Stage 1
partitions the optimizer state over the N data-parallel ranks, stage 2 also the gradients, stage 3 also the weights.
Frozen parts keep only their weights (no gradients, no optimizer state); under stage 3 those are partitioned too.
Communication per step per GPU (same paper, section 7): stage 0-2 move ~2*Psi (reduce-scatter of gradients and
all-gather of updated weights, i.e. an all-reduce); stage 3 ~3*Psi (weights all-gathered again in forward and in
backward). Activations are counted tensor by tensor for a Llama/ViT block (the method of Korthikanti et al., 2022,
"Reducing Activation Recomputation in Large Transformer Models"), assuming flash/memory-efficient attention (no
L x L score matrix is kept).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pretrain.config import DeepSpeedConfig
from pretrain.model.flops import PEAK_FLOPS, PROJECTOR_DEPTH, VLMShape, count_params, mfu, trainable_components
from pretrain.plan.comm import collective_calls, comm_per_step, offload_seconds, sub_group_size
from pretrain.plan.workload import Workload

GIB = 1024**3
OPTIMIZER_BYTES = {"bf16": 12, "fp32": 8}  # Adam: fp32 master + 2 moments (mixed precision), or 2 moments (fp32)
LOGIT_CHUNK_TOKENS = 1024  # chunked/fused cross-entropy: fp32 logits live for this many positions at a time


@dataclass(frozen=True)
class GPUSpec:
    key: str  # its row in pretrain.model.flops.PEAK_FLOPS, the one table of peaks
    name: str
    memory_bytes: int  # what the driver reports as total
    nvlink_Bps: float  # achievable intra-node all-reduce bus bandwidth per GPU, bytes/s (assumption)
    pcie_Bps: float  # achievable host<->GPU copy bandwidth, bytes/s (assumption)

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s."""
        return PEAK_FLOPS[self.key]


# name, memory the driver reports (MiB), achievable intra-node all-reduce bus bandwidth and host copy bandwidth
# (bytes/s, assumptions); the peak comes from pretrain.model.flops.PEAK_FLOPS.
_GPU_TABLE: dict[str, tuple[str, int, float, float]] = {
    "a100-40gb": ("A100 SXM 40GB", 40960, 230e9, 25e9),
    "a100-80gb": ("A100 SXM 80GB", 81920, 230e9, 25e9),
    "h100": ("H100 SXM 80GB", 81559, 360e9, 50e9),
    "h200": ("H200 SXM 141GB", 143771, 360e9, 50e9),
    "l40s": ("L40S 48GB (PCIe, no NVLink)", 46068, 20e9, 25e9),
    "mi300x": ("MI300X 192GB", 196608, 300e9, 50e9),
    "b200": ("B200 180GB", 183359, 720e9, 50e9),
}
GPUS: dict[str, GPUSpec] = {key: GPUSpec(key, name, mib * 2**20, link, host)
                            for key, (name, mib, link, host) in _GPU_TABLE.items()}
GPUS["a100"] = GPUS["a100-80gb"]  # the name earlier versions took


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (and on the host, per GPU, for what is offloaded)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    overhead: float
    host: float = 0.0
    replica: float = 0.0  # a frozen vision tower kept whole on every rank, outside ZeRO-3 (pretrain.model.frozen)

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.buffers + self.overhead
                + self.replica)

    def as_gib(self) -> dict[str, float]:
        return {**{k: v / GIB for k, v in asdict(self).items()}, "total": self.total / GIB}


def memory_per_gpu(work: Workload, ds: DeepSpeedConfig, n_gpus: int, overhead_gib: float = 2.0) -> Memory:
    """Model states by ZeRO stage (the ZeRO paper's formulas), activations of one micro-batch, comm buffers.

    `overhead_gib` stands for the CUDA context, NCCL's buffers and allocator fragmentation (an assumption).
    """
    counts = count_params(work.shape)
    trainable, total = work.trained_params(counts), counts.total + work.lora.adapters
    pb = gb = 2 if work.precision == "bf16" else 4
    k_opt = OPTIMIZER_BYTES[work.precision]
    stage, n = ds.zero_stage, n_gpus
    persist = _persistent_params(work.shape, ds) if stage == 3 else 0

    params = pb * ((total - persist) / n + persist) if stage == 3 else pb * total
    grads = gb * trainable / (n if stage >= 2 else 1)
    optimizer = k_opt * trainable / (n if stage >= 1 else 1)
    host = 0.0
    if ds.offload_optimizer != "none" and stage >= 1:
        host += optimizer
        optimizer = 0.0
        if stage >= 2:  # DeepSpeed copies each reduced gradient partition into fp32 host buffers
            host += 4 * trainable / n
            grads = 0.0
    if ds.offload_params != "none" and stage == 3:
        host += params - pb * persist
        params = pb * persist
    buffers, replica = _buffer_bytes(work.shape, ds, pb), 0.0
    trained = trainable_components(work.stage)
    if stage == 3:
        # The optimizer steps one sub-group at a time through an fp32 copy of its gradients (offloaded, the fp32
        # gradient partitions on the host above are that copy).
        if ds.offload_optimizer == "none":
            buffers += 4 * min(sub_group_size(ds), trainable / n)
        if ds.frozen_unpartitioned and "vision" not in trained:
            replica = pb * counts.vision
        if ds.frozen_unpartitioned and "llm" not in trained:  # the frozen decoder is held gathered for the step
            buffers += pb * counts.llm * (1 - 1 / n)
    return Memory(params, grads, optimizer, activation_bytes(work), buffers, overhead_gib * GIB, host, replica)


def activation_bytes(work: Workload) -> float:
    """Saved activations of one micro-batch (plus one layer in flight), per GPU."""
    shape, trained = work.shape, trainable_components(work.stage)
    llm, vis = shape.llm, shape.vision
    a = 2 if work.precision == "bf16" else 4
    tokens = work.micro_batch * work.peak_row_tokens
    samples = work.batch().samples
    h, i, q, kv = llm.hidden, llm.intermediate, llm.q_dim, llm.kv_dim
    # Bytes one decoder layer keeps per token. transformers' RMSNorm upcasts: its fp32 input is saved (4h), and the
    # normalised output too when the weight trains. Flash/SDPA attention keeps q, k, v, out; SwiGLU keeps gate, up
    # and silu(gate), plus their product when down_proj's weight needs it. Frozen linears keep no inputs.
    trains = "llm" in trained
    per_layer = 2 * (4 * h + a * h * trains) + a * (2 * q + 2 * kv) + a * i * (4 if trains else 3)
    ckpt = work.checkpointed_layers(llm.layers)
    decoder = tokens * (ckpt * a * h + (llm.layers - ckpt) * per_layer + per_layer + 2 * a * h)
    logit_rows = samples * work.logit_tokens
    if work.chunked_ce:
        logits = min(logit_rows, LOGIT_CHUNK_TOKENS) * llm.vocab * 8  # fp32 logits + their gradient
    else:
        logits = logit_rows * llm.vocab * (a + 8)
    images = work.batch().images
    vision = images * vis.seq * vis.hidden * a  # the selected features, at least
    if "vision" in trained:
        v_layer = 8 * vis.hidden + 2 * vis.intermediate
        g = shape.vision_grad_layers
        v_ckpt = math.ceil(g * ckpt / llm.layers)
        vision += images * vis.seq * a * (v_ckpt * vis.hidden + (g - v_ckpt) * v_layer + v_layer)
    depth = PROJECTOR_DEPTH[shape.projector]
    projector = images * shape.image_tokens * a * (shape.projector_in + 2 * (depth - 1) * h + h)
    return (decoder + logits + vision + projector) / work.sequence_parallel


def _buffer_bytes(shape: VLMShape, ds: DeepSpeedConfig, pb: int) -> float:
    """DeepSpeed's communication buckets and, under stage 3, the gathered working set of weights."""
    if ds.zero_stage in (1, 2):
        # DeepSpeed's docs: overlap_comm uses 4.5x the reduce/all-gather bucket sizes.
        return (4.5 if ds.overlap_comm else 1.0) * ds.reduce_bucket_size * pb
    reduce = ds.reduce_bucket_size * pb * (2 if ds.overlap_comm else 1)
    if ds.zero_stage == 0:
        return reduce
    live = min(_largest_module(shape) + ds.prefetch_bucket_size, ds.max_live_parameters)
    return reduce + live * pb


def _persistent_params(shape: VLMShape, ds: DeepSpeedConfig) -> int:
    """ZeRO-3 keeps tensors under `param_persistence_threshold` elements whole on every rank."""
    return sum(n for _, n in shape.tensors() if n < ds.param_persistence_threshold)


def _largest_module(shape: VLMShape) -> int:
    """Elements of the largest module ZeRO-3 gathers at once (often the embedding or the LM head)."""
    modules: dict[str, int] = {}
    for name, n in shape.tensors():
        key = name.rsplit(".", 1)[0]
        modules[key] = modules.get(key, 0) + n
    return max(modules.values())


@dataclass(frozen=True)
class StepEstimate:
    n_gpus: int
    micro_batch: int
    grad_accum: int
    global_rows: int
    tokens_per_step: int
    flops_per_gpu: float  # model FLOPs per GPU per optimizer step
    compute_s: float
    comm_bytes: float  # sent per GPU per step
    comm_s: float
    exposed_comm_s: float
    offload_s: float
    step_s: float
    need_Bps: float  # link bandwidth that would hide all communication behind compute
    link_Bps: float
    memory: Memory = field(repr=False)
    collective_calls: float = 0.0  # per optimizer step (pretrain.plan.comm.collective_calls)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_s / self.n_gpus

    def effective_mfu(self, peak: float) -> float:
        """MFU of the whole step, communication and offload included (compute alone runs at Cluster.mfu)."""
        return mfu(self.flops_per_gpu, self.step_s, 1, peak)

    def hours_for(self, tokens: float) -> float:
        return tokens / self.tokens_per_step * self.step_s / 3600

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "memory"}
        return {**out, "memory_gib": self.memory.as_gib(), "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu}


@dataclass(frozen=True)
class Cluster:
    """The hardware as the step-time model sees it. Step time = hardware FLOPs / `flops_per_s` + collective calls x
    `call_s` + `fixed_step_s` + byte traffic not hidden behind compute + host optimizer work. Uncalibrated, the
    FLOP rate is `mfu` x the data-sheet peak and a call costs NCCL's latency between GPUs; `pretrain plan
    --calibrate` fits the rate, the call cost and the fixed cost to measured runs instead
    (pretrain.plan.calibrate)."""

    gpu: GPUSpec
    mfu: float = 0.4  # utilisation of the peak on the hardware's FLOPs (an assumption unless measured)
    mfu_source: str = "assumed"  # where `mfu` comes from, for the report
    flops_per_s: float | None = None  # achieved FLOP/s on the hardware's work, measured; None: mfu x peak
    call_s: float = 30e-6  # one collective call's cost (uncalibrated: NCCL's small-message latency within a node)
    fixed_step_s: float = 0.0  # per optimizer step whatever its size (optimizer, host sync, logging), measured
    calibrated: bool = False  # the call cost is measured (it then holds on one device too: hooks, bookkeeping)
    net_Bps: float = 50e9  # inter-node bandwidth per GPU (one 400 Gb/s NIC per GPU)
    gpus_per_node: int = 8
    cpu_adam_params_per_s: float = 1e9  # host Adam throughput per GPU (memory-bound, ~30 B per parameter)
    overhead_gib: float = 2.0

    def link_Bps(self, n_gpus: int) -> float:
        return self.gpu.nvlink_Bps if n_gpus <= self.gpus_per_node else self.net_Bps

    @property
    def rate(self) -> float:
        """FLOP/s achieved on the hardware's work."""
        return self.flops_per_s if self.flops_per_s is not None else self.mfu * self.gpu.peak_flops

    def calls_seconds(self, calls: float, n_gpus: int) -> float:
        return calls * self.call_s if self.calibrated or n_gpus > 1 else 0.0


def estimate_step(work: Workload, ds: DeepSpeedConfig, n_gpus: int, cluster: Cluster) -> StepEstimate | None:
    """Step time = the hardware's FLOPs at the cluster's rate + collective calls + communication not hidden behind
    compute + host optimizer work + a fixed cost per step (Cluster)."""
    split = work.split_for(n_gpus)
    if split is None:
        return None
    work = replace(work, micro_batch=split[0], grad_accum=split[1])
    accum, sp = work.grad_accum, work.sequence_parallel
    flops = work.micro_flops()
    flops_per_gpu = flops.total * accum / sp
    compute = work.hardware_flops() * accum / sp / cluster.rate
    backward = compute * flops.backward / flops.total
    link = cluster.link_Bps(n_gpus)
    chunks = comm_per_step(work, ds, n_gpus, accum, compute, backward)
    comm_bytes = sum(b for b, _ in chunks)
    comm_s = comm_bytes / link
    exposed = sum(max(0.0, b / link - window) for b, window in chunks) if ds.overlap_comm else comm_s
    # Ulysses' all-to-alls sit between the projections and the attention: nothing overlaps them.
    all_to_all = work.all_to_all_bytes() * accum
    comm_bytes, comm_s = comm_bytes + all_to_all, comm_s + all_to_all / cluster.link_Bps(sp)
    exposed += all_to_all / cluster.link_Bps(sp)
    calls = collective_calls(work, ds, n_gpus)
    exposed += cluster.calls_seconds(calls, n_gpus)
    offload = offload_seconds(work, ds, n_gpus, cluster.gpu.pcie_Bps, cluster.cpu_adam_params_per_s)
    step = compute + exposed + offload + cluster.fixed_step_s
    rows = work.micro_batch * accum * (n_gpus // sp)
    tokens = round(work.batch().tokens / work.micro_batch * rows)
    return StepEstimate(n_gpus, work.micro_batch, accum, rows, tokens, flops_per_gpu, compute,
                        comm_bytes, comm_s, exposed, offload, step, comm_bytes / compute, link,
                        memory_per_gpu(work, ds, n_gpus, cluster.overhead_gib), calls)
