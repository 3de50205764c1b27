"""What a loader slot saves with every batch and reads back on resume: its position in each source (StreamState,
with the pieces of an interrupted epoch an elastic resume handed it: Piece) and its buffers and counts (SlotState).
The saved form is plain dicts and lists (`to_dict` / `from_dict`), as checkpoints and JSON keep them."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Piece:
    """Samples `start, start + step, ...` below `stop` (None: to the shard's end) of one shard, read in source epoch
    `epoch`: a slot's share of what old slots left unread (pretrain.data.elastic)."""

    epoch: int
    url: str
    start: int
    stop: int | None
    step: int

    def first_at(self, index: int) -> int:
        """The piece's first sample index at or after `index`."""
        return self.start + max(0, -(-(index - self.start) // self.step)) * self.step

    def to_list(self) -> list:
        return [self.epoch, self.url, self.start, self.stop, self.step]


@dataclass
class StreamState:
    epoch: int = 0
    shard_pos: int = 0  # index into this slot's shard list of the epoch
    sample_pos: int = 0  # next sample index within that shard
    taken: int = 0  # samples this slot took in this epoch (counted against `epoch_samples`)
    lost: dict[str, int] = field(default_factory=dict)
    # After a resume on other slots: this slot's part of the interrupted epoch(s), read before `epoch` starts;
    # sample_pos is the next index to read within piece `rest_pos`.
    rest: list[Piece] = field(default_factory=list)
    rest_pos: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lost": dict(self.lost), "rest": [p.to_list() for p in self.rest]}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> StreamState:
        """From `to_dict`'s form; keys left out keep their defaults (a new slot names only its epoch and rest)."""
        return cls(**{**saved, "lost": dict(saved.get("lost", {})), "rest": [Piece(*p) for p in saved.get("rest", [])]})


@dataclass
class SlotState:
    streams: list[StreamState] = field(default_factory=list)  # one per source
    mix_rng: tuple | None = None
    buffer_rng: tuple | None = None
    buffer: list[tuple[int, str, int]] = field(default_factory=list)  # (source, url, index) of buffered samples
    pending: list[tuple[int, str, int]] = field(default_factory=list)  # the same, of samples the batcher holds
    buffer_epochs: list[int] = field(default_factory=list)  # the source epoch each of them was read in
    pending_epochs: list[int] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    skipped: list[dict[str, int]] = field(default_factory=list)
    truncated: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        rest = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "streams"}
        return {"streams": [s.to_dict() for s in self.streams], **rest}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> SlotState:
        """From `to_dict`'s form; keys left out keep their defaults."""
        return cls(**{**copy.deepcopy(saved), "streams": [StreamState.from_dict(s) for s in saved.get("streams", [])]})


def skip_counts(slots: Iterable[SlotState], source: int) -> dict[str, int]:
    """Samples of `source` that `slots` did not train on, by reason: refused by the processor or lost with a shard."""
    total: dict[str, int] = {}
    for s in slots:
        for counts in (s.skipped[source] if s.skipped else {}, s.streams[source].lost if s.streams else {}):
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
    return total
