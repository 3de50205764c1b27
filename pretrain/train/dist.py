"""Process-group set-up and tear-down for one training process.

Works under torchrun (`pretrain launch`), under srun (SLURM_* variables), and alone (world size 1). On CPU DeepSpeed
picks gloo by itself. `finish` is the exit path every run takes: barrier, destroy the group, flush, then os._exit,
because ~4% of 2-rank DeepSpeed runs otherwise abort one rank at interpreter exit after all work is done.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import socket
import sys
import warnings

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
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish(code: int, *, synchronize: bool = True) -> None:
    """Leave the process: a barrier (only when all ranks are known to get here), destroy the group, flush, _exit."""
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            if synchronize:
                dist.barrier()
            dist.destroy_process_group()
    except Exception as err:  # a peer may already be gone; the exit code still tells the truth
        log.warning("process-group tear-down failed: %s", err)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
