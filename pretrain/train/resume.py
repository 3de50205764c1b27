"""What a checkpoint holds and how a resume puts it back: the run's Stateful parts, each registered once.

torchtitan's CheckpointManager pattern: every piece a resume must restore exposes `state_dict()` /
`load_state_dict()` and is registered once (Trainer.__init__), with how it maps onto another number of ranks:

- RUN: the run's own record, the same on every rank (the trainer: step, tokens seen, tracker runs). Rank 0 writes
  it; every rank reads rank 0's.
- RANK: a rank's own (its RNG). Restored at the same world size; on another one no new rank is an old one, and the
  generators go on from the run's seed.
- DATA_PARALLEL: restored from every old data-parallel rank's state (the loader: Megatron-Energon's
  restore_state_global), given by data-parallel rank: the ranks of a sequence-parallel group (consecutive ranks)
  read the same data and save the same state, and a group's first rank's stands for it. The part decides itself
  whether it continues in place or splits its rest over the new layout; a rank's state is read when the part first
  asks for it (`SavedRanks`), so a resume in place reads only its own file (and rank 0's).

Rank r's parts live in `trainer_rank<r>.pt` of the checkpoint (pretrain.train.checkpoint). The model, optimizer
and LR schedule are DeepSpeed's own sharded files (`EngineCheckpoint`), loaded through DeepSpeed's universal format
when the number of ranks or the ZeRO stage changed (pretrain.train.universal).
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterator, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pretrain.train import checkpoint as ckpt
from pretrain.train.universal import UNIVERSAL, ResumeError

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> None: ...


LAYOUT = "layout"  # a rank file's record of the parallel layout that wrote it


class Scope(enum.Enum):
    RUN = "run"
    RANK = "rank"
    DATA_PARALLEL = "data_parallel"


class RNGState:
    """The process's random generators: Python's, NumPy's, torch's CPU one and, on CUDA, the device's."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class SavedRanks(Mapping):
    """Every old rank's saved parts of one checkpoint by rank (`[r]`: rank r's), each file read when first asked
    for; a rank of the old world whose file is missing is a ResumeError."""

    def __init__(self, ckpt_dir: Path, world: int) -> None:
        self.ckpt_dir, self.world = Path(ckpt_dir), world
        self._read: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.world))

    def __contains__(self, rank: object) -> bool:
        return isinstance(rank, int) and 0 <= rank < self.world

    def __getitem__(self, rank: int) -> dict[str, Any]:
        if rank not in self:
            raise KeyError(rank)
        if rank not in self._read:
            state = ckpt.read_rank_state(self.ckpt_dir, rank)
            if state is None:
                raise ResumeError(f"{self.ckpt_dir}: trainer state of rank {rank} of {self.world} is missing")
            self._read[rank] = state
        return self._read[rank]

    def part(self, name: str, group: int = 1) -> Mapping[int, dict[str, Any]]:
        """One part of the old ranks' states, read as lazily, by data-parallel rank: `[d]` is rank d x `group`'s
        (`group`: the old sequence-parallel size; 1: every rank by its rank)."""
        return _PartOfRanks(self, name, group)


class _PartOfRanks(Mapping):
    def __init__(self, ranks: SavedRanks, name: str, group: int) -> None:
        self.ranks, self.name, self.group = ranks, name, group

    def __len__(self) -> int:
        return len(self.ranks) // self.group

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __contains__(self, rank: object) -> bool:
        return isinstance(rank, int) and 0 <= rank < len(self)

    def __getitem__(self, rank: int) -> dict[str, Any]:
        if rank not in self:
            raise KeyError(rank)
        return self.ranks[rank * self.group][self.name]


class EngineCheckpoint:
    """The model, optimizer and LR schedule: DeepSpeed's own sharded files in the checkpoint directory."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def save(self, path: Path) -> None:
        versions = {p: version(p) for p in ("torch", "deepspeed", "transformers")}  # for the reader's information
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"versions": versions},
                                    save_latest=False)

    def load(self, path: Path, universal: bool) -> None:
        load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
        loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ResumeError(f"DeepSpeed could not load {path}")
        if self.engine.module.frozen_tower is not None:  # the replica holds the loaded tower, not the built one
            self.engine.module.frozen_tower.refresh()


class Checkpointer:
    """The run's parts, registered once: `save_engine` + `save_parts` write a checkpoint's files of this rank,
    `load` restores every part from a committed checkpoint."""

    def __init__(self, engine: Any, rank: int, world: int, sequence_parallel_size: int = 1) -> None:
        self.engine = EngineCheckpoint(engine)
        self.rank, self.world, self.sequence_parallel_size = rank, world, sequence_parallel_size
        self.parts: dict[str, tuple[Stateful, Scope]] = {}

    def register(self, name: str, part: Stateful, scope: Scope) -> None:
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} is registered already")
        self.parts[name] = (part, scope)

    def save_engine(self, path: Path) -> None:
        self.engine.save(path)

    def save_parts(self, path: Path) -> Path:
        """This rank's parts (the RUN ones on rank 0 only) into `trainer_rank<r>.pt`; returns that file."""
        state = {name: part.state_dict() for name, (part, scope) in self.parts.items()
                 if scope is not Scope.RUN or self.rank == 0}
        state[LAYOUT] = {"sequence_parallel_size": self.sequence_parallel_size}
        return ckpt.write_rank_state(path, self.rank, state)

    def load(self, path: Path, meta: dict[str, Any], universal: bool) -> None:
        """Every part from the committed checkpoint `path` (`meta`: its COMMITTED record); `universal`: the engine
        loads DeepSpeed's universal conversion of it (pretrain.train.universal.prepare)."""
        self.engine.load(path, universal)
        old_world = meta["world_size"]
        saved = SavedRanks(path, old_world)
        for name, (part, scope) in self.parts.items():
            if scope is Scope.RUN:
                part.load_state_dict(saved[0][name])
            elif scope is Scope.RANK:
                if old_world == self.world:
                    part.load_state_dict(saved[self.rank][name])
            else:
                part.load_state_dict(saved.part(name, saved[0][LAYOUT]["sequence_parallel_size"]))
        if self.rank != 0:
            return
        if old_world == self.world:
            log.info("resumed from %s at step %d", path, meta["step"])
        else:
            log.warning("resumed from %s at step %d on %d rank(s); it was written by %d%s", path, meta["step"],
                        self.world, old_world, " (through DeepSpeed's universal checkpoint)" * universal)
