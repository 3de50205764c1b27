"""Process groups and the one communication layer of the project.

Set-up and tear-down: works under torchrun (`pretrain launch`), under srun (SLURM_* variables), and alone (world
size 1). On CPU DeepSpeed picks gloo by itself. `finish` is the exit path every run takes: barrier, destroy the
group, flush, then os._exit, because ~4% of 2-rank DeepSpeed runs otherwise abort one rank at interpreter exit.

Communication: every collective the project issues is a function here (all_reduce, all_reduce_values,
broadcast_object, all_gather_object, barrier). Each places its tensors on the process group's communication device
(CUDA under NCCL, CPU under gloo), returns tensors on the caller's device or Python numbers, and runs whenever a
group exists, world size 1 included. No other module calls torch.distributed (a test reads the sources).
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

# Exit codes a launcher or an sbatch script can act on.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on a signal; resume me.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    env.setdefault("MASTER_PORT", str(_free_port()))


def init(timeout_minutes: int) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank)."""
    environment_from_slurm_or_alone()
    # torch 2.13 warns on every ZeRO-3 collective DeepSpeed 0.19 issues; one line per step buries the log.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* deprecated")
    import deepspeed

    if not torch.cuda.is_available():
        # DeepSpeed builds a shared-memory comm op (~45 s compile) on CPU at init; training never uses it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def device() -> torch.device:
    """This rank's compute device (the accelerator LOCAL_RANK names, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
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
