"""Process groups and the one communication layer of the project.

Set-up and tear-down: works under torchrun (`pretrain launch`), under srun (SLURM_* variables), and alone (world
size 1). On CPU DeepSpeed picks gloo by itself. `finish` is the exit path every run takes: barrier, destroy the
group, flush, then os._exit, because ~4% of 2-rank DeepSpeed runs otherwise abort one rank at interpreter exit.

Communication: every collective the project issues is a function here (all_reduce, all_reduce_values, all_gather,
all_gather_with_grad, broadcast_object, all_gather_object, barrier). Each places its tensors on the process group's
communication device (CUDA under NCCL, CPU under gloo), returns tensors on the caller's device or Python numbers,
and runs whenever a group exists, world size 1 included. No other module calls torch.distributed (a test reads the
sources). It sits below the data and the model (the import layers in pyproject.toml), so both may use it.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from pretrain.ports import free_port

log = logging.getLogger(__name__)


def skip_shm_op_build() -> None:
    """On a host without CUDA, stop DeepSpeed from compiling its shared-memory comm op (~45 s on first use) at
    init_distributed: nothing of ours uses it. Call before deepspeed.init_distributed."""
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def environment_from_slurm_or_alone() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from Slurm, or for a lone process, when a launcher did not."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("under srun, MASTER_ADDR and MASTER_PORT must be exported (the sbatch template does)")
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def init(timeout_minutes: float) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank)."""
    environment_from_slurm_or_alone()
    # torch 2.13 warns on every ZeRO-3 collective DeepSpeed 0.19 issues; one line per step buries the log.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* deprecated")
    import deepspeed

    skip_shm_op_build()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(bind_gpu())
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank


def device() -> torch.device:
    """This rank's compute device (the accelerator LOCAL_RANK names, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_gpu())
    return torch.device("cpu")


# -- the communication layer ----------------------------------------------------------------------------------------
# Every collective of the project goes through the functions below. A process group only serves the device types
# its backend was created for: DeepSpeed creates "nccl" on GPUs (cuda only), so a collective on a CPU tensor there
# raises "No backend type associated with device type cpu". Each function therefore moves its tensor to the
# group's communication device and hands the result back on the caller's device (or as Python numbers). They run
# whenever a group exists, world size 1 included, so a 1-GPU run issues exactly the calls a 512-GPU run does.

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def active() -> bool:
    """A process group exists (collectives run, at any world size)."""
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def backend_devices(group: Any = None) -> dict[str, str]:
    """{device type: backend} of a group, e.g. {"cuda": "nccl"} or {"cpu": "gloo", "cuda": "nccl"}."""
    import torch.distributed as tdist

    config = str(tdist.get_backend_config(group))  # "cuda:nccl", "cpu:gloo,cuda:gloo", ...
    return dict(part.split(":", 1) for part in config.split(","))


def placement(device_types: Iterable[str], caller: torch.device) -> torch.device:
    """Where a group whose backend serves `device_types` must hold a tensor that lives on `caller`: the caller's
    own device when served (no copy), else the accelerator (the current CUDA device under NCCL), else the CPU."""
    types = set(device_types)
    if caller.type in types:
        return caller
    if "cuda" in types:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")
    if "cpu" in types:
        return torch.device("cpu")
    raise RuntimeError(f"the process group serves {sorted(types)}; cannot place a tensor from {caller}")


def comm_device(caller: torch.device | None = None, group: Any = None) -> torch.device:
    """The device a collective of `group` runs on for a tensor that lives on `caller` (CPU when unsaid)."""
    return placement(backend_devices(group), caller or torch.device("cpu"))


def all_reduce(t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """The reduction over ranks of `t`, as a new tensor on `t`'s device (`t` is left as it was). No read back to
    the host: under NCCL this only queues work on the GPU. Without a process group: a copy of `t`."""
    if not active():
        return t.clone()
    import torch.distributed as tdist

    where = comm_device(t.device, group)
    work = t.clone() if where == t.device else t.to(where)
    tdist.all_reduce(work, op=getattr(tdist.ReduceOp, _OPS[op]), group=group)
    return work.to(t.device)


def all_reduce_values(values: Sequence[float | int | torch.Tensor], op: str = "sum",
                      group: Any = None) -> list[float]:
    """Several numbers reduced in one collective and read back to the host once (the one synchronisation).
    Host numbers and 0-d device tensors may be mixed: the tensors stay on their device until the single read."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    home = tensors[0].device if tensors else torch.device("cpu")
    where = comm_device(home, group) if active() else home
    packed = torch.stack([v.detach().reshape(()).to(where, torch.float64) if isinstance(v, torch.Tensor)
                          else torch.tensor(float(v), dtype=torch.float64).to(where, non_blocking=True)
                          for v in values])
    if active():
        import torch.distributed as tdist

        tdist.all_reduce(packed, op=getattr(tdist.ReduceOp, _OPS[op]), group=group)
    return to_host(packed)


def to_host(t: torch.Tensor) -> list[float]:
    """A device tensor's values as Python floats: a device-to-host copy, i.e. a synchronisation (an explicit copy,
    so tools that count synchronisations see it on a CPU-only machine too)."""
    return t.to("cpu", copy=True).reshape(-1).tolist()


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(this rank, world size) of a group; (0, 1) without a process group."""
    if not active():
        return 0, 1
    import torch.distributed as tdist

    return tdist.get_rank(group), tdist.get_world_size(group)


def all_gather(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's `t` (the same shape on every rank), in rank order, on `t`'s device; not differentiable. No read
    back to the host. Without a process group: [t]."""
    if not active():
        return [t]
    import torch.distributed as tdist

    work = t.to(comm_device(t.device, group)).contiguous()
    out = [torch.empty_like(work) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(out, work, group=group)
    return [o.to(t.device) for o in out]


def all_gather_with_grad(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """As all_gather, but differentiable: the backward brings each rank the sum over the group of every rank's
    gradient for its rows (a reduce-scatter; the moves to and from the group's device are in the graph too). No
    read back to the host. Without a process group: [t]."""
    if not active():
        return [t]
    import torch.distributed as tdist

    rows = _GatherWithGrad.apply(group or tdist.group.WORLD, t.to(comm_device(t.device, group)).contiguous())
    return [r.to(t.device) for r in rows]


class _GatherWithGrad(torch.autograd.Function):
    """Ours rather than torch.distributed.nn's all_gather: on gloo its backward scatters from group-local indices
    taken as global ranks, which fails in any group that is not the world (a sequence-parallel group)."""

    @staticmethod
    def forward(ctx: Any, group: Any, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch.distributed as tdist

        ctx.group = group
        out = [torch.empty_like(t) for _ in range(tdist.get_world_size(group))]
        tdist.all_gather(out, t, group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, torch.Tensor]:
        import torch.distributed as tdist

        stacked = torch.stack([g.contiguous() for g in grads])
        if tdist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter: sum everything, keep this rank's
            tdist.all_reduce(stacked, group=ctx.group)
            return None, stacked[tdist.get_rank(ctx.group)]
        mine = torch.empty_like(stacked[0])
        tdist.reduce_scatter_tensor(mine, stacked.flatten(0, 1), group=ctx.group)
        return None, mine


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """`obj` of rank `src` on every rank (picklable objects; small: paths, tags, decisions)."""
    if not active():
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=group, device=comm_device(group=group))
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable, small)."""
    if not active():
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Any = None) -> None:
    if active():
        import torch.distributed as tdist

        tdist.barrier(group=group)


def finish(code: int, *, synchronize: bool = True) -> None:
    """Leave the process: a barrier (only when all ranks are known to get here), destroy the group, flush, _exit."""
    import torch.distributed as tdist

    try:
        if active():
            if synchronize:
                tdist.barrier()
            tdist.destroy_process_group()
    except Exception as err:  # a peer may already be gone; the exit code still tells the truth
        log.warning("process-group tear-down failed: %s", err)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- sequence-parallel groups ---------------------------------------------------------------------------------
# Ulysses sequence parallelism (pretrain.model.sequence_parallel): groups of N consecutive ranks share each sample.
# DeepSpeed's parallel_state_sp makes the groups and is the `mpu` its engine takes, which then reduces gradients
# over all ranks and divides them by the data-parallel size (world / N).
def init_sequence_parallel(size: int) -> tuple[Any, Any, int]:
    """Make the sequence-parallel groups of `size` ranks; returns (DeepSpeed's mpu, this rank's group, its rank in
    the group). Collective: every rank calls it once, after `init`."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(size)
    return mpu, mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()


# ---- rank-0-only work, and the GPU a task uses ---------------------------------------------
# Rank-0-only work (a checkpoint commit, a universal-checkpoint conversion) may outlast the collective timeout
# (deepspeed.timeout_minutes); the other ranks wait for it in the rendezvous store instead (rank0_work).
_rank0_calls = 0


def rank0_work(work: Callable[[], Any], rank: int, timeout_minutes: float) -> Any:
    """Run `work` on rank 0 while the others wait for its end without a collective; every rank returns its result
    or raises its error (as a RuntimeError naming it). All ranks must call it in the same order.

    The others wait on a key in the process group's rendezvous store with `timeout_minutes` (sized for the work),
    so a long commit or conversion does not trip the collective timeout, nor the NCCL watchdog."""
    import pickle

    import torch.distributed as tdist

    global _rank0_calls
    _rank0_calls += 1
    if not active() or tdist.get_world_size() == 1:
        return work() if rank == 0 else None
    store = tdist.distributed_c10d._get_default_store()
    key = f"pretrain/rank0_work/{_rank0_calls}"
    if rank == 0:
        try:
            result = work()
        except Exception as err:  # handed to the others, then raised here as it was
            store.set(key, pickle.dumps((None, f"{type(err).__name__}: {err}")))
            raise
        store.set(key, pickle.dumps((result, None)))
        return result
    store.wait([key], datetime.timedelta(minutes=timeout_minutes))
    result, error = pickle.loads(store.get(key))
    if error is not None:
        raise RuntimeError(f"rank 0 failed: {error}")
    return result


def gpu_ordinal(local_rank: int, visible: int) -> int:
    """The CUDA device a task uses, whichever way the launcher bound GPUs: with one device visible (Slurm's
    --gpus-per-task=1 or --gpu-bind, a site's per-task CUDA_VISIBLE_DEVICES) it is device 0 whatever LOCAL_RANK
    says; with the node's GPUs all visible (torchrun, plain srun) it is LOCAL_RANK."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but {visible} GPU(s) visible to this task: launch one task "
                           "per GPU, with all of the node's GPUs visible or exactly one per task")
    return local_rank


def visible_gpus() -> int:
    """CUDA devices this process can use: torch's count, or on a host without CUDA the CUDA_VISIBLE_DEVICES list
    a launcher set (so a CPU node shows the choice a GPU node would make)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([i for i in ids.split(",") if i.strip()]) if ids else 0


def local_gpu() -> int:
    """This task's CUDA ordinal (gpu_ordinal of LOCAL_RANK and the visible devices)."""
    return gpu_ordinal(int(os.environ.get("LOCAL_RANK", 0)), visible_gpus())


def bind_gpu() -> int:
    """Choose this task's CUDA ordinal (local_gpu) and make LOCAL_RANK name it: DeepSpeed takes LOCAL_RANK as the
    device ordinal (its NCCL group's device_id, zero.Init, the engine), so under one-GPU-per-task binding a task
    with LOCAL_RANK 3 would ask for a device that does not exist. Returns the ordinal."""
    local_rank, visible = os.environ.get("LOCAL_RANK", "0"), visible_gpus()
    gpu = local_gpu()
    if str(gpu) != local_rank:
        os.environ.setdefault("NODE_LOCAL_RANK", local_rank)  # the task's place on its node, kept for the logs
        os.environ["LOCAL_RANK"] = str(gpu)
    log.info("LOCAL_RANK %s, %d GPU(s) visible to this task: cuda:%d", local_rank, visible, gpu)
    return gpu


def backends_available() -> dict[str, bool]:
    """Which collective backends this torch build has."""
    import torch.distributed as tdist

    return {"nccl": tdist.is_nccl_available(), "gloo": tdist.is_gloo_available()}


def rendezvous_store(timeout_s: float) -> Any:
    """A connection of its own to the process group's rendezvous store (torchrun's agent store, or rank 0's under
    srun): the key-value service every rank already reaches, used for what must never wait in a collective
    (progress reports, the hang watchdog). A clone, so a thread using it never queues behind this process's other
    store calls (rank0_work's long wait holds its own connection); its calls give up after `timeout_s`. None
    without a process group."""
    if not active():
        return None
    import torch.distributed as tdist

    store = tdist.distributed_c10d._get_default_store().clone()
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


# ---- groups of some of the ranks ------------------------------------------------------------------------------------
def new_group(ranks: Sequence[int]) -> Any:
    """A process group of `ranks` (e.g. a sequence-parallel group whose ranks split the vision tower's work), with
    the world's backend. Every rank of the world calls it, member or not, in the same order. None without a
    process group."""
    if not active():
        return None
    import torch.distributed as tdist

    return tdist.new_group(sorted(ranks))
