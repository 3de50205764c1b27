"""The training loader: shards -> mixed, shuffled, decoded, tokenized, batched samples, exactly resumable.

Each (rank, worker) pair is a *slot* running a SlotPipeline: per-source SourceStreams mixed by weight, a shuffle
buffer holding sample references, the SampleProcessor, and a Batcher. Every batch leaves the worker tagged with its
slot's state *after* that batch, so the main process can save exactly the position of what the trainer consumed,
however far the DataLoader prefetched. torch's DataLoader takes batches from workers round-robin, so on resume the
worker order is rotated to continue with the slot that was next.

A resume is given every old rank's state (`load_state_dict(states)`, Megatron-Energon's restore_state_global) and
decides here, once, how to go on: on the same layout (`layout()`: world size, workers, seed, sources, batching) each
rank continues its own slots in place and reads only its own state; on another layout the rest of the epoch,
computed from the states of all old ranks, is split exactly over the new slots (pretrain.data.elastic).

Every batch carries `sample_keys` (source, shard, key and source epoch of each sample) for data.record_samples.

Epochs: a source's epoch is one pass over its shards. A source read as a stream (`pipe:`, http) may instead be given
an epoch size (`LoaderSpec.epoch_size`, the config's `data.epoch_size`): each slot's epoch of it then ends after its
share, ceil(epoch_size / slots), of samples, and the next epoch starts over with a new shard order.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
from collections.abc import Iterator, Mapping

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data import elastic, errors
from pretrain.data.batching import Batcher, collate, vision_cost
from pretrain.data.elastic import source_fingerprint
from pretrain.data.errors import SampleError
from pretrain.data.loader_spec import LoaderSpec
from pretrain.data.remote import StreamPolicy
from pretrain.data.sample import SampleProcessor
from pretrain.data.slot_state import SlotState, skip_counts
from pretrain.data.stream import ShardReader, ShuffleBuffer, SourceStream, seeded_rng
from pretrain.data.urls import is_remote

log = logging.getLogger(__name__)


class SlotPipeline:
    def __init__(self, spec: LoaderSpec, processor: SampleProcessor, slot: int, state: SlotState | None) -> None:
        self.spec, self.processor, self.slot = spec, processor, slot
        n_slots = spec.world_size * max(spec.num_workers, 1)
        self.reader = ShardReader(StreamPolicy(spec.stream_timeout_s, spec.stream_retries))
        st = state or SlotState()
        n = len(spec.sources)
        self.streams = [
            SourceStream(urls, slot, n_slots, spec.seed, i, spec.shuffle, self.reader,
                         copy.deepcopy(st.streams[i]) if st.streams else None, _epoch_share(spec, urls, n_slots))
            for i, urls in enumerate(spec.sources)]
        self.mix_rng = seeded_rng(spec.seed, slot, "mix")
        self.buffer = ShuffleBuffer(spec.shuffle_buffer if spec.shuffle else 1, seeded_rng(spec.seed, slot, "buf"))
        if st.mix_rng is not None:
            self.mix_rng.setstate(_as_rng_state(st.mix_rng))
            self.buffer.rng.setstate(_as_rng_state(st.buffer_rng))
        self.ok = list(st.ok) or [0] * n
        self.skipped = [dict(d) for d in st.skipped] or [{} for _ in range(n)]
        self.truncated, self.batches = st.truncated, st.batches
        self.batcher = Batcher(spec.rows_per_batch, spec.max_length, spec.packing, spec.max_images_per_batch)
        self._done: set[int] = set()  # sources whose single pass is complete
        self._restore(st)

    def _restore(self, st: SlotState) -> None:
        # At a batch boundary the batcher holds at most the carried-over sample: re-pushing rebuilds it exactly.
        refs = [*st.pending, *st.buffer]
        raws = self.reader.read_refs([(url, index) for _, url, index in refs])
        epochs = [*st.pending_epochs, *st.buffer_epochs]
        for (src, _, _), raw, epoch in zip(refs, raws, epochs):
            if raw is None:  # its shard vanished or broke since the save: the sample is lost, and counted
                lost = self.streams[src].state.lost
                lost[errors.UNREADABLE_SHARD] = lost.get(errors.UNREADABLE_SHARD, 0) + 1
            else:
                raw.epoch = epoch
        for (src, _, _), raw in zip(st.pending, raws):
            if raw is not None:
                sample = self.processor(raw.parts)
                self.batcher.push(((src, raw.url, raw.index, raw.epoch), raw.key, sample), len(sample),
                                  vision_cost(sample))
        for (src, _, _), raw in zip(st.buffer, raws[len(st.pending):]):
            if raw is not None:
                self.buffer.items.append((src, raw))

    def state(self) -> SlotState:
        return SlotState(
            streams=[copy.deepcopy(s.state) for s in self.streams],
            mix_rng=self.mix_rng.getstate(), buffer_rng=self.buffer.rng.getstate(),
            buffer=self.buffer.refs(), pending=[ref[:3] for ref, _, _ in self.batcher.pending()],
            buffer_epochs=self.buffer.epochs(), pending_epochs=[ref[3] for ref, _, _ in self.batcher.pending()],
            ok=list(self.ok), skipped=[dict(d) for d in self.skipped], truncated=self.truncated,
            batches=self.batches)

    def _next_raw(self) -> tuple[int, object] | None:
        """The next (source, raw sample); None once every source finished its single pass."""
        live = [i for i in range(len(self.streams)) if i not in self._done]
        while live:
            src = live[0] if len(live) == 1 else self.mix_rng.choices(live, [self.spec.weights[i] for i in live])[0]
            raw = self.streams[src].next()
            if not (self.spec.single_pass and self.streams[src].state.epoch > 0):
                return src, raw
            self._done.add(src)  # that sample opened the source's second epoch: the pass over it is complete
            live.remove(src)
        return None

    def __iter__(self) -> Iterator[dict]:
        while True:
            # A resume on fewer slots hands each more buffered samples than the buffer holds: drain those first.
            if self.buffer.overfull():
                rows = self._add(self.buffer.push_pop(None))
            else:
                raw = self._next_raw()
                if raw is None:
                    break
                rows = self._add(self.buffer.push_pop(raw))
            if rows is not None:
                yield self._batch(rows)
        while self.buffer.items:  # single pass over: what the shuffle buffer and the batcher still hold
            rows = self._add(self.buffer.push_pop(None))
            if rows is not None:
                yield self._batch(rows)
        rest = self.batcher.rows + ([self.batcher.current] if self.batcher.current else [])
        if rest:
            self.batcher.rows, self.batcher.current = [], []
            yield self._batch(rest)

    def _add(self, item: tuple[int, object] | None) -> list[list] | None:
        """Decode one sample into the batcher; a finished micro-batch's rows, or None."""
        if item is None:
            return None
        src, raw = item
        try:
            sample = self.processor(raw.parts)
            cost = vision_cost(sample)
            budget = self.spec.max_images_per_batch
            if budget is not None and cost > budget:
                raise SampleError(errors.TOO_MANY_IMAGES, f"{cost} images or tiles > {budget} per micro-batch")
        except SampleError as err:
            self.skipped[src][err.reason] = self.skipped[src].get(err.reason, 0) + 1
            return None
        self.ok[src] += 1
        self.truncated += int(sample.truncated)
        return self.batcher.push(((src, raw.url, raw.index, raw.epoch), raw.key, sample), len(sample), cost)

    def _batch(self, rows: list[list]) -> dict:
        self.batches += 1
        batch = collate([[s for _, _, s in row] for row in rows], self.spec.pad_id, widths=self.spec.row_widths)
        batch["sample_keys"] = [{"source": ref[0], "shard": ref[1], "key": key, "epoch": ref[3]}
                                for row in rows for ref, key, _ in row]
        batch["_slot"] = self.slot
        batch["_state"] = self.state()
        return batch


def layout(spec: LoaderSpec) -> dict:
    """What a saved position depends on: with all of it equal a resume continues each slot in place; otherwise
    the rest of the epoch is recomputed from every old slot (pretrain.data.elastic)."""
    return {"world_size": spec.world_size, "num_workers": spec.num_workers, "seed": spec.seed,
            "shuffle": spec.shuffle, "epoch_size": spec.epoch_size,
            "sources": [source_fingerprint(urls) for urls in spec.sources],
            "batching": [spec.rows_per_batch, spec.max_length, spec.packing, spec.max_images_per_batch]}


_LAYOUT_KEYS = ("world_size", "num_workers", "seed", "shuffle", "epoch_size", "sources", "batching")


def _saved_layout(state: dict) -> dict:
    """The layout a saved state was written under."""
    return {k: state[k] for k in _LAYOUT_KEYS}


def _epoch_share(spec: LoaderSpec, urls: list[str], n_slots: int) -> int | None:
    """A slot's samples per epoch of a stream source under `epoch_size`; None for shard-sized epochs."""
    if spec.epoch_size is None or not any(is_remote(u) for u in urls):
        return None
    return -(-spec.epoch_size // n_slots)


def _as_rng_state(state) -> tuple:
    # JSON/YAML round trips turn the tuple into lists; random.setstate wants the exact nesting back.
    return (state[0], tuple(state[1]), state[2])


def _ignore_signals(_worker_id: int) -> None:
    """Cluster signals go to every process of a job step; the trainer decides what to do, workers keep serving."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _SlotDataset(IterableDataset):
    def __init__(self, spec: LoaderSpec, processor: SampleProcessor, states: dict[int, SlotState], offset: int):
        self.spec, self.processor, self.states, self.offset = spec, processor, states, offset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = max(self.spec.num_workers, 1)
        local = ((info.id if info else 0) + self.offset) % w
        slot = self.spec.rank * w + local
        torch.set_num_threads(1)
        yield from SlotPipeline(self.spec, self.processor, slot, self.states.get(slot))


class ResumableLoader:
    """Iterate batches; `state_dict()` is the position after the last batch handed out."""

    def __init__(self, spec: LoaderSpec, processor: SampleProcessor, states: Mapping[int, dict] | None = None) -> None:
        self.spec, self.processor = spec, processor
        self.slot_states: dict[int, SlotState] = {}
        self.consumed = 0
        if states:
            self.load_state_dict(states)

    def load_state_dict(self, states: Mapping[int, dict]) -> None:
        """Continue from a checkpoint, given the old ranks' states by rank (`states[r]`: what rank r's `state_dict()`
        returned; a mapping that reads each when first asked for does: a resume in place asks only for its own).
        The one place that decides: on the same layout this rank continues its own slots in place; on another, the
        rest of the epoch, from every old rank's slots, is split over the new slots."""
        own = states[self.spec.rank] if self.spec.rank in states else None
        if own is not None and _saved_layout(own) == json.loads(json.dumps(layout(self.spec))):  # as saved
            self.consumed = own["consumed"]
            self.slot_states = {int(k): SlotState.from_dict(v) for k, v in own["slots"].items()}
            return
        old_world = (own or states[0])["world_size"]
        old = [states[r] for r in range(old_world)]
        if len(states) != old_world or any(_saved_layout(s) != _saved_layout(old[0]) for s in old):
            raise ValueError(f"{len(states)} loader states of {old_world} old ranks, or of different layouts: an "
                             "elastic resume needs every old rank's state, all from one checkpoint")
        log.warning("data: world size or workers changed (%s x %s -> %s x %s) or the sources or batching did: "
                    "the rest of the interrupted epoch is split over the new slots", len(old),
                    old[0]["num_workers"], self.spec.world_size, self.spec.num_workers)
        split = elastic.split_rest(old, self.spec, ShardReader())
        self.slot_states = {t: SlotState.from_dict(d) for t, d in split.items()}

    def state_dict(self) -> dict:
        """This rank's position: its slots after the last batch handed out, and the layout they depend on."""
        return {**layout(self.spec), "consumed": self.consumed,
                "slots": {str(k): v.to_dict() for k, v in self.slot_states.items()}}

    def stats(self) -> dict:
        """Cumulative counts over this rank's slots: ok and skipped per reason (all sources summed) and per source."""
        n = len(self.spec.sources)
        ok = [sum(s.ok[i] for s in self.slot_states.values() if s.ok) for i in range(n)]
        skipped = [skip_counts(self.slot_states.values(), i) for i in range(n)]
        return {"ok": ok, "skipped": skipped, "truncated": sum(s.truncated for s in self.slot_states.values())}

    def __iter__(self) -> Iterator[dict]:
        w = self.spec.num_workers
        offset = self.consumed % max(w, 1)
        dataset = _SlotDataset(self.spec, self.processor, self.slot_states, offset)
        if w == 0:
            it = iter(dataset)
        else:
            it = iter(DataLoader(dataset, batch_size=None, num_workers=w, worker_init_fn=_ignore_signals,
                                 prefetch_factor=4, pin_memory=torch.cuda.is_available(),
                                 generator=torch.Generator().manual_seed(self.spec.seed)))
        for batch in it:
            self.slot_states[batch.pop("_slot")] = batch.pop("_state")
            self.consumed += 1
            yield batch
