"""Read a DeepSpeed ZeRO checkpoint one tensor at a time, never consolidating the model in memory.

What DeepSpeed 0.19 writes (deepspeed/utils/zero_to_fp32.py reads the same files; see also engine._save_checkpoint):
- ZeRO-3: each rank r writes `zero_pp_rank_{r}_mp_rank_00_model_states.pt` (param shapes per param group, frozen
  parameters as rank partitions, buffers, tied-parameter aliases) and `..._optim_states.pt`, whose fp32 flat groups
  are the concatenation of rank r's partition of every trainable parameter: a parameter of n elements takes
  ceil(n / world) elements at the same offset on every rank (the last rank's tail is padding).
- ZeRO-1/2 (and bf16 without ZeRO): one `mp_rank_00_model_states.pt` (the whole module state dict in the training
  dtype, param shapes, and for stage 2 the frozen parameters again) and per rank an `..._optim_states.pt` whose
  `single_partition_of_fp32_groups[g]` is rank r's slice of group g's flat fp32 vector; parameters lie end to end in
  that vector in param-shape order, each followed by its alignment padding.
- ZeRO-0 in fp32: no optimizer shards; the module state dict holds the weights.
Frozen parameters (no optimizer state) exist only in the training dtype: ZeRO-3 and 2 keep them as
`frozen_param_fragments`, ZeRO-0/1 only in the module state dict.

Memory: files are opened with torch.load(mmap=True), which costs only their pickled metadata; tensor data is paged
in as it is read, handed out as views of at most `chunk_bytes`. Pages that were read stay resident (and count in
RSS) while a file is mapped, so after every `release_bytes` read all files are dropped (unmapped once the consumer
let go of the last piece) and re-opened on demand. Peak memory is about release_bytes + a piece, independent of
model and tensor size.

Reused from DeepSpeed: the file discovery and ZeRO-3 partition arithmetic of zero_to_fp32, and its key constants.
Deliberately not reused: its parse_model_states (loads model-state files without mmap: for ZeRO-1/2 that is the whole
model), parse_optim_states (keeps every rank file mapped for the whole run), _zero2_merge_trainable_params
(concatenates whole groups) and GatheredTensor (materialises a whole tensor and keeps its pages mapped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import (
    BUFFER_NAMES,
    FP32_FLAT_GROUPS,
    FROZEN_PARAM_FRAGMENTS,
    FROZEN_PARAM_SHAPES,
    OPTIMIZER_STATE_DICT,
    PARAM_ALIGNMENT_PADDINGS,
    PARAM_SHAPES,
    PARTITION_COUNT,
    SINGLE_PARTITION_OF_FP32_GROUPS,
    ZERO_STAGE,
)
from deepspeed.utils.zero_to_fp32 import get_model_state_files, natural_keys, zero3_partitioned_param_info

log = logging.getLogger(__name__)

RELEASE_BYTES = 256 << 20
CHUNK_BYTES = 32 << 20
SHARED_PARAMS = "shared_params"  # DeepSpeed writes this key literally (no constant for it)


@dataclass(frozen=True)
class _Loc:
    """Where one tensor's elements are. kind: zero3 (rank partitions in the fp32 flat groups), zero12 (a range of
    group `group`'s flat vector, split over ranks), frozen3 (rank partitions in frozen_param_fragments), whole (one
    tensor in rank 0's model states, at `key`)."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: int = 0
    offset: int = 0
    key: tuple[str, str] = ("", "")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _torch_load(path: Path) -> dict[str, Any]:
    # weights_only=False: DeepSpeed pickles its own objects (enums, loss scaler); these are the user's own files.
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        log.warning("%s: not in the zip format, so it cannot be memory-mapped; loading it whole", path.name)
        return torch.load(path, map_location="cpu", weights_only=False)


class ZeroCheckpoint:
    """A DeepSpeed checkpoint tag directory. `locs` names every tensor it holds (DeepSpeed's names: the training
    module's `named_parameters`), `pieces(name)` yields its elements in order as flat tensors of its stored dtype."""

    def __init__(self, tag_dir: str | Path, release_bytes: int = RELEASE_BYTES, chunk_bytes: int = CHUNK_BYTES):
        self.dir = Path(tag_dir)
        self.release_bytes, self.chunk_bytes = release_bytes, chunk_bytes
        self.model_files = [Path(p) for p in get_model_state_files(str(self.dir))]
        self.optim_files = sorted(self.dir.glob("*_optim_states.pt"), key=lambda p: natural_keys(p.name))
        if any("mp_rank_00" not in p.name for p in self.model_files + self.optim_files):
            raise NotImplementedError(f"{self.dir}: tensor- or pipeline-parallel checkpoints are not supported")
        self._open: dict[Path, dict[str, Any]] = {}
        self._resident = 0
        model0 = self._load(self.model_files[0])
        self.shared: dict[str, str] = dict(model0.get(SHARED_PARAMS) or {})  # alias -> the name that holds data
        self.locs: dict[str, _Loc] = {}
        self.stage, self.world_size = 0, 1
        if self.optim_files:
            self._index_trainable(model0, self._optim(0))
        self.trainable = frozenset(self.locs)
        self._index_rest(model0)
        if not self.optim_files:
            # ZeRO-0 in fp32 records nothing about what was trained: treat every saved tensor as trained.
            self.trainable = frozenset(self.locs)
            self.world_size = int(model0.get("dp_world_size", 1))

    # -- index ---------------------------------------------------------------------------------------------------------
    def _index_trainable(self, model0: dict, optim0: dict) -> None:
        counts = optim0.get(PARTITION_COUNT, len(self.optim_files))
        self.world_size = max(counts) if isinstance(counts, list) else int(counts)
        if self.world_size != len(self.optim_files):
            raise ValueError(f"{self.dir}: {len(self.optim_files)} optimizer shards for a world size of "
                             f"{self.world_size} (a rank's files are missing or from another save)")
        if FP32_FLAT_GROUPS in optim0:
            self.stage = 3
            if len(self.model_files) != self.world_size:
                raise ValueError(f"{self.dir}: {len(self.model_files)} model-state files, expected {self.world_size}")
            self._index_zero3(model0, optim0[FP32_FLAT_GROUPS])
        elif SINGLE_PARTITION_OF_FP32_GROUPS in optim0:
            self.stage = int(optim0.get(ZERO_STAGE, 0))  # bf16 without ZeRO has no stage key: 0
            self._index_zero12(model0, optim0)
        else:
            raise ValueError(f"{self.optim_files[0]}: no fp32 master weights (not a ZeRO checkpoint)")

    def _index_zero3(self, model0: dict, flats: list[torch.Tensor]) -> None:
        shapes = {name: shape for group in model0[PARAM_SHAPES] for name, shape in group.items()}
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            self.locs[name] = _Loc("zero3", tuple(shape), flats[0].dtype, offset=offset)
            offset += zero3_partitioned_param_info(numel, self.world_size)[0]
        available = sum(t.numel() for t in flats)
        if offset != available:
            raise ValueError(f"{self.dir}: param shapes need {offset} elements per rank, the flat groups hold "
                             f"{available}")

    def _index_zero12(self, model0: dict, optim0: dict) -> None:
        paddings = optim0.get(PARAM_ALIGNMENT_PADDINGS)
        align = 2 * self.world_size  # as zero_to_fp32: both ends are padded to a multiple of 2 x world size
        for g, shapes in enumerate(model0[PARAM_SHAPES]):
            part = optim0[SINGLE_PARTITION_OF_FP32_GROUPS][g]
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                self.locs[name] = _Loc("zero12", tuple(shape), part.dtype, group=g, offset=offset)
                offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
            available = part.numel() * self.world_size
            if math.ceil(offset / align) != math.ceil(available / align):
                raise ValueError(f"{self.dir}: group {g} needs {offset} elements, its partitions hold {available}")

    def _index_rest(self, model0: dict) -> None:
        frozen = model0.get(FROZEN_PARAM_SHAPES) or {}
        fragments = model0.get(FROZEN_PARAM_FRAGMENTS) or {}
        for name, shape in frozen.items():
            kind, key = ("frozen3", ("", "")) if self.stage == 3 else ("whole", (FROZEN_PARAM_FRAGMENTS, name))
            self.locs[name] = _Loc(kind, tuple(shape), fragments[name].dtype, key=key)
        module = model0.get("module") or {}
        # Under ZeRO-3 the module state dict holds size-0 placeholders for parameters: only buffers are real there.
        names = model0.get(BUFFER_NAMES, []) if self.stage == 3 else list(module)
        for name in names:
            if name not in self.locs and name in module:
                t = module[name]
                self.locs[name] = _Loc("whole", tuple(t.shape), t.dtype, key=("module", name))

    # -- reading -------------------------------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """The name holding `name`'s data (following tied-parameter aliases), or None if absent."""
        name = self.shared.get(name, name)
        return name if name in self.locs else None

    def pieces(self, name: str) -> Iterator[torch.Tensor]:
        loc = self.locs[name]
        ws = self.world_size
        if loc.kind == "zero12":
            yield from self._span(lambda: [self._optim(r)[SINGLE_PARTITION_OF_FP32_GROUPS][loc.group]
                                           for r in range(ws)], loc.offset, loc.numel)
        elif loc.kind == "whole":
            section, key = loc.key
            yield from self._span(lambda: [self._load(self.model_files[0])[section][key]], 0, loc.numel)
        else:  # zero3 / frozen3: the same ceil(n / world) elements from each rank, in rank order
            part = zero3_partitioned_param_info(loc.numel, ws)[0]
            for r in range(ws):
                take = min(part, loc.numel - r * part)
                if take <= 0:
                    break
                if loc.kind == "zero3":
                    yield from self._span(lambda r=r: self._optim(r)[FP32_FLAT_GROUPS], loc.offset, take)
                else:
                    yield from self._span(lambda r=r: [self._fragment(r, name, part)], 0, take)

    def _span(self, tensors: Callable[[], list[torch.Tensor]], start: int, length: int) -> Iterator[torch.Tensor]:
        """Elements [start, start + length) of the concatenation of `tensors()`, as views of at most chunk_bytes.
        `tensors` is called for every chunk because a release in between drops what it returned before."""
        pos, end = start, start + length
        while pos < end:
            base = 0
            for t in tensors():
                if pos < base + t.numel():
                    break
                base += t.numel()
            else:
                raise ValueError(f"{self.dir}: reading past the end of a flat group (offset {pos})")
            n = min(end - pos, base + t.numel() - pos, max(1, self.chunk_bytes // t.element_size()))
            piece = t.reshape(-1)[pos - base : pos - base + n]  # a view: no copy; it keeps its mapping alive
            nbytes = piece.nbytes
            del t
            yield piece
            del piece
            self._touched(nbytes)  # after the consumer is done with the piece
            pos += n

    def _fragment(self, rank: int, name: str, part: int) -> torch.Tensor:
        frag = self._load(self.model_files[rank])[FROZEN_PARAM_FRAGMENTS][name].reshape(-1)
        if frag.numel() != part:
            raise ValueError(f"{self.model_files[rank].name}: {name} partition has {frag.numel()} elements, "
                             f"expected {part}")
        return frag

    def _optim(self, rank: int) -> dict[str, Any]:
        return self._load(self.optim_files[rank])[OPTIMIZER_STATE_DICT]

    def _load(self, path: Path) -> dict[str, Any]:
        if path not in self._open:
            self._open[path] = _torch_load(path)
        return self._open[path]

    def _touched(self, nbytes: int) -> None:
        self._resident += nbytes
        if self._resident >= self.release_bytes:
            self.release()

    def release(self) -> None:
        """Unmap every file (dropping the pages read so far from this process); they re-open on demand."""
        self._open.clear()
        self._resident = 0
