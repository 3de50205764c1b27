"""Fault injection for the tests of the failure paths, as a `pretrain` plug-in (PRETRAIN_PLUGINS,
pretrain.cli.plugins): the product has no test switch; this module wraps what it needs in the processes of
`pretrain train` and `pretrain eval` when the test's environment asks for it (`fault_env`).

Faults (a JSON object in PRETRAIN_FAULTS):
- nan_steps [s, ...]: the training loss of those steps is NaN (every micro-batch);
- step_sleep t, step_sleep_from s: t seconds added after each training forward from step s on (signal tests);
- die {rank, step}: that rank exits with code 13 right after that step;
- commit_sleep t: rank 0 spends t more seconds in each checkpoint commit;
- enospc_in_save {rank, step}: that rank's first DeepSpeed file of that step's save fails with ENOSPC;
- torn_save {rank, step, file}: SIGKILL half-way through writing that DeepSpeed file (every rank of the node);
- run_dir {rank, path}: that rank sees run.output_dir at `path` (a node-local directory);
- zero_image_features: the image features are zeroed (a broken image path), in training and evaluation.
In-process tests call `install(spec, monkeypatch.setattr)` instead, so the patches are undone after the test.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAULTS = "PRETRAIN_FAULTS"
TESTS = Path(__file__).resolve().parents[1]
Patch = Callable[[Any, str, Any], None]


def fault_env(spec: dict[str, Any]) -> dict[str, str]:
    """The environment entries that make every `pretrain` process started with them inject `spec`'s faults."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {"PRETRAIN_PLUGINS": "helpers.faults", FAULTS: json.dumps(spec), "PYTHONPATH": path}


def activate(command: str) -> None:
    """The plug-in entry: install the faults of PRETRAIN_FAULTS in the commands that train or evaluate."""
    spec = json.loads(os.environ.get(FAULTS) or "{}")
    if spec and command in ("train", "eval"):
        install(spec)


def install(spec: dict[str, Any], patch: Patch = setattr) -> None:
    if spec.get("zero_image_features"):
        _zero_image_features(patch)
    if spec.get("torn_save") or spec.get("enospc_in_save"):
        _deepspeed_save_faults(spec, patch)
    if spec.get("commit_sleep"):
        _slow_commit(float(spec["commit_sleep"]), patch)
    if any(spec.get(k) for k in ("nan_steps", "step_sleep", "die", "run_dir")):
        _trainer_faults(spec, patch)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _hit(where: dict | None, rank: int, step: int) -> bool:
    return bool(where) and where["rank"] == rank and where["step"] == step


def _zero_image_features(patch: Patch) -> None:
    from pretrain.model.vlm import VLMForTraining

    image_features, visual_features = VLMForTraining.image_features, VLMForTraining.visual_features

    def zeroed_image_features(self, *args, **kwargs):
        return image_features(self, *args, **kwargs) * 0.0

    def zeroed_visual_features(self, *args, **kwargs):
        images, clips, dummy = visual_features(self, *args, **kwargs)
        return images * 0.0, None if clips is None else clips * 0.0, dummy

    patch(VLMForTraining, "image_features", zeroed_image_features)
    patch(VLMForTraining, "visual_features", zeroed_visual_features)


def _slow_commit(seconds: float, patch: Patch) -> None:
    from pretrain.train import checkpoint

    commit = checkpoint.commit

    def slow_commit(*args, **kwargs):
        time.sleep(seconds)
        return commit(*args, **kwargs)

    patch(checkpoint, "commit", slow_commit)


class _FaultyEngine:
    """The DeepSpeed engine as one step sees it, with a NaN loss and/or a sleep after each forward."""

    def __init__(self, engine: Any, nan: bool, sleep: float) -> None:
        self._engine, self._nan, self._sleep = engine, nan, sleep

    def __call__(self, *args, **kwargs):
        loss, count = self._engine(*args, **kwargs)
        if self._nan:
            loss = loss * float("nan")
        if self._sleep:
            time.sleep(self._sleep)
        return loss, count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _trainer_faults(spec: dict[str, Any], patch: Patch) -> None:
    """Faults that need the trainer: its run directory at start-up, and the step it is taking."""
    from pretrain.train import trainer as trainer_module

    init, train_step = trainer_module.Trainer.__init__, trainer_module.train_step
    running = []  # the Trainer of this process
    nan_steps, sleep, sleep_from = set(spec.get("nan_steps", [])), float(spec.get("step_sleep", 0.0)), \
        int(spec.get("step_sleep_from", 1))

    def faulty_init(self, cfg):
        moved = spec.get("run_dir")
        if moved and moved["rank"] == _rank():
            cfg = cfg.model_copy(deep=True)
            cfg.run.output_dir = moved["path"]
        running.append(self)
        init(self, cfg)

    def faulty_step(engine, *args, **kwargs):
        trainer = running[-1]
        step = trainer.step + 1
        out = train_step(_FaultyEngine(engine, step in nan_steps, sleep if step >= sleep_from else 0.0),
                         *args, **kwargs)
        if _hit(spec.get("die"), trainer.rank, step):
            os._exit(13)
        return out

    patch(trainer_module.Trainer, "__init__", faulty_init)
    patch(trainer_module, "train_step", faulty_step)


def _deepspeed_save_faults(spec: dict[str, Any], patch: Patch) -> None:
    """Wrap DeepSpeed's checkpoint writer on the rank the fault names: `enospc_in_save` fails the first file of
    that step's save with ENOSPC (a full disk); `torn_save` writes the first half of the named file's bytes
    (flushed), then SIGKILLs every rank of the node at once, as a node losing power: a real torn shard that no
    surviving rank cleans up."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    full, torn = spec.get("enospc_in_save"), spec.get("torn_save")
    save = TorchCheckpointEngine.save

    def faulty_save(engine, state_dict, path: str):
        if full and full["rank"] == _rank() and f"step_{full['step']:08d}" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if torn and torn["rank"] == _rank() and f"step_{torn['step']:08d}" in str(path) \
                and torn["file"] in os.path.basename(str(path)):
            _tear(state_dict, str(path))
        return save(engine, state_dict, path)

    patch(TorchCheckpointEngine, "save", faulty_save)


def _tear(state_dict: Any, path: str) -> None:
    import psutil  # DeepSpeed's own dependency
    import torch

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
