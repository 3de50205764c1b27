"""Fault injection for the tests of the failure paths (a NaN loss, a rank that dies, a save killed half-way, a file
torn by a kill inside DeepSpeed's save, a full disk, a slow step, a slow commit, a rank whose run directory is not
the others').

Read from the PRETRAIN_TEST_FAULTS environment variable (JSON, through pretrain.fault_switch, which the model's one
test switch reads too); empty in any real run. Kept in one place so the trainer's own code stays free of test
branches.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import time

import torch

from pretrain.fault_switch import fault_spec


class Faults:
    def __init__(self) -> None:
        spec = fault_spec()
        self.nan_steps = set(spec.get("nan_steps", []))
        self.die = spec.get("die")  # {"rank": r, "step": s}
        self.enospc_in_save = spec.get("enospc_in_save")  # {"rank": r, "step": s}: ENOSPC at the trainer-state write
        self.step_sleep = float(spec.get("step_sleep", 0.0))  # seconds added to each step (signal tests) ...
        self.step_sleep_from = int(spec.get("step_sleep_from", 1))  # ... from this step on
        self.commit_sleep = float(spec.get("commit_sleep", 0.0))  # seconds rank 0 adds to each checkpoint commit
        self.run_dir = spec.get("run_dir")  # {"rank": r, "path": p}: rank r sees run.output_dir at p (node-local)
        # {"rank": r, "step": s, "file": part of a name}: SIGKILL half-way through writing that DeepSpeed file
        if spec.get("torn_save"):
            _tear_deepspeed_save(spec["torn_save"])

    @staticmethod
    def _hit(spec: dict | None, rank: int, step: int) -> bool:
        return bool(spec) and spec["rank"] == rank and spec["step"] == step

    def loss_is_nan(self, step: int) -> bool:
        return step in self.nan_steps

    def maybe_sleep(self, step: int) -> None:
        if self.step_sleep and step >= self.step_sleep_from:
            time.sleep(self.step_sleep)

    def maybe_die(self, rank: int, step: int) -> None:
        if self._hit(self.die, rank, step):
            os._exit(13)

    def maybe_disk_full(self, rank: int, step: int, path: str) -> None:
        if self._hit(self.enospc_in_save, rank, step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def maybe_slow_commit(self) -> None:
        if self.commit_sleep:
            time.sleep(self.commit_sleep)

    def run_dir_for(self, rank: int, output_dir: str) -> str:
        """run.output_dir as this rank sees it: another directory for the rank a `run_dir` fault names."""
        if self.run_dir and self.run_dir["rank"] == rank:
            return self.run_dir["path"]
        return output_dir


def _tear_deepspeed_save(spec: dict) -> None:
    """Wrap DeepSpeed's checkpoint writer so that, on one rank and step, the file whose name contains spec["file"]
    gets the first half of its bytes on disk (flushed), then every rank of the node is SIGKILLed at once, as a
    node losing power: a real torn shard that no surviving rank cleans up."""
    import psutil  # DeepSpeed's own dependency
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if int(os.environ.get("RANK", "0")) != spec["rank"]:
        return
    save = TorchCheckpointEngine.save
    where = f"step_{spec['step']:08d}"

    def torn(engine, state_dict, path: str):
        if where not in str(path) or spec["file"] not in os.path.basename(str(path)):
            return save(engine, state_dict, path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        for sibling in psutil.Process(os.getppid()).children():  # the launcher's ranks, this one last
            if sibling.pid != os.getpid():
                sibling.kill()
        os.kill(os.getpid(), signal.SIGKILL)

    TorchCheckpointEngine.save = torn
