"""Resuming an epoch on other slots: what the old slots had not yet consumed, split exactly over the new ones.

An epoch's order is global: a source's shards in a permutation seeded by (seed, source, epoch), slot s of S taking
every S-th shard (or every S-th sample when there are fewer shards than slots; see pretrain.data.stream). A saved
slot position (epoch, shard_pos, sample_pos) therefore names exactly what that slot has read; what it read but did
not train on sits in its shuffle buffer and its batcher (`buffer`, `pending`) as references.

The rest, per source, from every old slot (the states of *all* old ranks):
- its unread part of its current epoch and its whole shares of later epochs up to the furthest epoch any old slot
  reached (slots drift apart when shards hold different sample counts): pieces (pretrain.data.slot_state.Piece);
- the samples in its buffer and batcher, which go back into the new slots' shuffle buffers.
Pieces of local shards (counts from the shard directory's manifest, else from tar headers; no sample is read)
are concatenated and cut into equal contiguous blocks, one per new slot. Stream pieces (`pipe:`, http: counts
unknown) go whole to the new slots in turn, or, when there are fewer of them than slots, every new slot reads each
and takes every n-th sample. After its rest every new slot continues at the next epoch in the new global split.

Not split: a stream source with `data.epoch_size` (its epoch is a count per slot, not a set of positions); it starts
its next epoch, and the loader says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

from pretrain.data.loader_spec import LoaderSpec
from pretrain.data.slot_state import Piece, SlotState, StreamState, skip_counts
from pretrain.data.stream import ShardReader, SourceStream
from pretrain.data.urls import is_remote

log = logging.getLogger(__name__)


def source_fingerprint(urls: list[str]) -> str:
    """Names a source by its shard list: a resume matches sources by it, so added or removed sources are seen."""
    return hashlib.sha256(json.dumps(list(urls)).encode()).hexdigest()[:16]


def split_rest(states: list[dict], spec: LoaderSpec, reader: ShardReader) -> dict[int, dict[str, Any]]:
    """The slot states (SlotState fields) of this rank's new slots, from every old rank's state (`states[r]`, all
    of one layout: the loader checks)."""
    state = states[0]  # the layout, the same in every one
    saved = {k: v for s in states for k, v in s["slots"].items()}
    n_old = len(states) * max(state["num_workers"], 1)
    # A slot missing from its rank's state never handed out a batch (a checkpoint before every worker had): it is
    # at the start of everything.
    slots = [saved.get(str(s)) or _fresh(len(state["sources"])) for s in range(n_old)]
    w = max(spec.num_workers, 1)
    n_new = spec.world_size * w
    mine = range(spec.rank * w, spec.rank * w + w)
    new = {t: {"streams": [], "buffer": [], "buffer_epochs": []} for t in mine}
    old_index = {fp: j for j, fp in enumerate(state["sources"])}
    for i, urls in enumerate(spec.sources):
        j = old_index.get(source_fingerprint(urls))
        if j is None:
            log.warning("data: source %d (%d shards) is new in this run: it starts at its first epoch", i, len(urls))
            positions: dict[int, dict] = {t: {"epoch": 0} for t in mine}
        else:
            positions = _split_source(state, slots, j, urls, n_new, mine, reader)
        for t in mine:
            # complete: a later resume reads every field
            new[t]["streams"].append(StreamState.from_dict(positions[t]).to_dict())
    _split_refs(state, slots, spec, n_new, new)
    if spec.rank == 0:  # the old counts live on in one slot, so the bad-fraction check keeps its history
        new[0].update(_old_counts(state, slots, spec))
    return new


def _fresh(n_sources: int) -> dict[str, Any]:
    return {"streams": [asdict(StreamState()) for _ in range(n_sources)], "buffer": [], "pending": [],
            "buffer_epochs": [], "pending_epochs": [], "ok": [], "skipped": [], "truncated": 0}


def _split_source(state: dict, slots: list[dict], j: int, urls: list[str], n_new: int, mine: range,
                  reader: ShardReader) -> dict[int, dict]:
    positions = [s["streams"][j] for s in slots]
    # The epoch every new slot goes on with: the first that no old slot has started.
    following = max(p["epoch"] + int(_started(p)) for p in positions)
    if state.get("epoch_size") is not None and any(is_remote(u) for u in urls):
        log.warning("data: source %d is a stream with data.epoch_size: the rest of its epoch is not split; it "
                    "starts epoch %d", j, following)
        return {t: {"epoch": following} for t in mine}
    n_old = len(slots)
    pieces: list[Piece] = []
    for s, pos in enumerate(positions):
        stream = SourceStream(urls, s, n_old, state["seed"], j, state["shuffle"], reader)
        rest = [Piece(*p) for p in pos["rest"][pos["rest_pos"]:]]
        if rest:  # still in the rest of an earlier resume: its current piece goes on from sample_pos
            rest[0].start = rest[0].first_at(pos["sample_pos"])
            pos = {**pos, "shard_pos": 0, "sample_pos": 0}
        pieces += rest + _unread(stream, pos, following - 1)
    blocks = _split_pieces(pieces, n_new, reader)
    return {t: {"epoch": following, "rest": [p.to_list() for p in blocks[t]]} for t in mine}


def _started(pos: dict) -> bool:
    return bool(pos["shard_pos"] or pos["sample_pos"] or pos["taken"]) and not pos["rest"]


def _unread(stream: SourceStream, pos: dict, last_epoch: int) -> list[Piece]:
    """What an old slot had not read of its epochs from its current one to `last_epoch`."""
    pieces = []
    n, s = stream.n_slots, stream.slot
    for epoch in range(pos["epoch"], last_epoch + 1):
        shards, by_sample = stream.shards_for(epoch)
        here = epoch == pos["epoch"]
        for p in range(pos["shard_pos"] if here else 0, len(shards)):
            begin = pos["sample_pos"] if here and p == pos["shard_pos"] else 0
            if by_sample:  # this slot takes the samples i with (offset + i) % n == s
                offset = sum(stream.reader.count(u) or 0 for u in shards[:p])
                pieces.append(Piece(epoch, shards[p], begin + (s - offset - begin) % n, None, n))
            else:
                pieces.append(Piece(epoch, shards[p], begin, None, 1))
    return pieces


def _split_pieces(pieces: list[Piece], n_new: int, reader: ShardReader) -> list[list[Piece]]:
    """Local pieces cut into n_new equal contiguous blocks; stream pieces dealt out (or strided when few)."""
    # A count above the real one (a shard cut after its manifest) only shifts block edges: reads stop at its end.
    local = [(p.epoch, p.url, range(p.start, _clipped_stop(p, reader.listed_count(p.url)), p.step))
             for p in pieces if not is_remote(p.url)]
    streams = [p for p in pieces if is_remote(p.url)]
    total = sum(len(r) for _, _, r in local)
    out: list[list[Piece]] = [[] for _ in range(n_new)]
    at = 0
    for e, url, r in local:
        for t in range(n_new):
            lo, hi = t * total // n_new - at, (t + 1) * total // n_new - at
            part = r[max(lo, 0):max(min(hi, len(r)), 0)]
            if len(part):
                out[t].append(Piece(e, url, part.start, part.stop, part.step))
        at += len(r)
    for t in range(n_new):
        if len(streams) >= n_new:
            out[t] += streams[t::n_new]
        else:
            out[t] += [Piece(p.epoch, p.url, p.start + t * p.step, p.stop, p.step * n_new) for p in streams]
    return out


def _clipped_stop(piece: Piece, count: int) -> int:
    return count if piece.stop is None else min(piece.stop, count)


def _split_refs(state: dict, slots: list[dict], spec: LoaderSpec, n_new: int, new: dict[int, dict]) -> None:
    """Samples read but not trained on (old buffers and batchers) dealt out to the new slots' shuffle buffers."""
    to_new = {j: spec_i for spec_i, urls in enumerate(spec.sources)
              for j, fp in enumerate(state["sources"]) if fp == source_fingerprint(urls)}
    refs = [(ref, epoch) for s in slots
            for ref, epoch in zip([*s["pending"], *s["buffer"]], [*s["pending_epochs"], *s["buffer_epochs"]])
            if ref[0] in to_new]
    for k, ((src, url, index), epoch) in enumerate(refs):
        t = k % n_new
        if t in new:
            new[t]["buffer"].append([to_new[src], url, index])
            new[t]["buffer_epochs"].append(epoch)


def _old_counts(state: dict, slots: list[dict], spec: LoaderSpec) -> dict[str, Any]:
    index = {fp: j for j, fp in enumerate(state["sources"])}
    old = [index.get(source_fingerprint(urls)) for urls in spec.sources]
    ok = [sum(s["ok"][j] for s in slots if s["ok"]) if j is not None else 0 for j in old]
    old_slots = [SlotState.from_dict(s) for s in slots]
    skipped = [skip_counts(old_slots, j) if j is not None else {} for j in old]
    return {"ok": ok, "skipped": skipped, "truncated": sum(s["truncated"] for s in slots)}
