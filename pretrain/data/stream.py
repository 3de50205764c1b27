"""Raw WebDataset samples with a resumable position.

webdataset's own pipeline cannot resume mid-epoch (its maintainer: no restartability guarantee with workers), so
this module reads the same tar format itself: local shards through an index of member offsets (tar headers only),
so a sample is addressable as (shard, index) and resuming seeks instead of reading; `pipe:` and http(s) shards are
opened with webdataset's `gopen` and resumed by skipping members at the byte level, never by decoding them.

Samples of an epoch: all shards of a source in a seeded per-epoch permutation; slot s of S (slot = rank x workers +
worker) takes every S-th shard. With fewer shards than slots every slot reads every shard and takes every S-th
sample instead, so no slot is ever starved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import set_options

from pretrain.data import errors
from pretrain.data.remote import RetryingStream, StreamPolicy, open_stream
from pretrain.data.slot_state import StreamState
from pretrain.data.tar_index import Member, file_size, group_members, stream_members, truncation
from pretrain.data.urls import MANIFEST_NAME, is_remote

log = logging.getLogger(__name__)

def seeded_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclass
class RawSample:
    key: str
    url: str
    index: int
    parts: dict[str, bytes]
    epoch: int = 0  # the source epoch it was read in (set by SourceStream)


class TarShardError(Exception):
    """A shard that ended early (`truncated_tar`) or could not be read at all or any more (`unreadable_shard`: any
    OSError, a missing file, a failed stream); its remaining samples are lost and counted."""

    def __init__(self, message: str, reason: str = errors.TRUNCATED_TAR) -> None:
        super().__init__(message)
        self.reason = reason


class ShardReader:
    """Reads one worker's shards; keeps an index per local shard for seeks. Streams (`pipe:`, http) are read under
    `policy` (a stall timeout and bounded retries: pretrain.data.remote)."""

    def __init__(self, policy: StreamPolicy | None = None) -> None:
        self.policy = policy or StreamPolicy()
        self._index: dict[str, list[tuple[str, list[tuple[str, Member]]]]] = {}
        self._errors: dict[str, tuple[str, str] | None] = {}  # url -> (reason, message) of an early end
        self._manifests: dict[Path, dict[str, tuple[int, int]]] = {}
        self._whole = [0, 0]  # samples and shards read whole: the size of a lost shard no manifest lists

    def _local_index(self, url: str) -> list[tuple[str, list[tuple[str, Member]]]]:
        if url not in self._index:
            members, error = [], None
            try:
                with tarfile.open(url, "r:") as tf:
                    for info in tf:
                        if info.isfile():
                            members.append((info.name, Member(info.name, info.offset_data, info.size)))
            except OSError as err:
                error = (errors.UNREADABLE_SHARD, f"{type(err).__name__}: {err}")
            except (tarfile.TarError, EOFError) as err:
                error = (errors.TRUNCATED_TAR, str(err))
            try:
                cut = None if error else truncation(url, [m for _, m in members])
                error = error or (cut and (errors.TRUNCATED_TAR, cut))
                size = file_size(url) if members else 0  # once per shard, not per member
            except OSError as err:
                error, size = (errors.UNREADABLE_SHARD, f"{type(err).__name__}: {err}"), 0
            index = list(group_members(iter(m for m in members if m[1].offset + m[1].size <= size)))
            if error and index:
                index = index[:-1]  # the last sample before the cut may be missing parts
            self._index[url] = index
            self._errors[url] = error
            if not error:
                self._whole[0] += len(index)
                self._whole[1] += 1
        return self._index[url]

    def count(self, url: str) -> int | None:
        return None if is_remote(url) else len(self._local_index(url))

    def _manifest_entry(self, path: Path) -> tuple[int, int] | None:
        """(samples, bytes) of a shard as its directory's manifest.json lists it; None when it does not."""
        if path.parent not in self._manifests:
            try:
                listed = json.loads((path.parent / MANIFEST_NAME).read_text())["shards"]
                self._manifests[path.parent] = {s["url"]: (int(s["samples"]), int(s["bytes"])) for s in listed}
            except (OSError, ValueError, KeyError, TypeError):
                self._manifests[path.parent] = {}
        return self._manifests[path.parent].get(path.name)

    def listed_count(self, url: str) -> int | None:
        """A local shard's sample count without reading it: from its directory's manifest.json when that lists the
        shard with its current size in bytes, else from its tar headers (`count`)."""
        if is_remote(url):
            return None
        if url in self._index:
            return len(self._index[url])
        path = Path(url)
        entry = self._manifest_entry(path)
        try:
            if entry is not None and path.is_file() and file_size(url) == entry[1]:
                return entry[0]
        except OSError:
            pass
        return self.count(url)

    def expected_count(self, url: str) -> int | None:
        """How many samples a shard holds, for counting what was lost when it failed: its manifest's count (what
        was written, whatever happened to the file since); else its own index if it was read whole; else the mean
        of the shards this reader has read whole; None when nothing is known (the loss then counts 1)."""
        if not is_remote(url):
            entry = self._manifest_entry(Path(url))
            if entry is not None:
                return entry[0]
            if url in self._index and not self._errors.get(url):
                return len(self._index[url])
        samples, shards = self._whole
        return round(samples / shards) if shards else None

    def _forget(self, url: str) -> None:
        """Drop what is known of an unreadable shard: the next epoch tries it again (a file system may recover)."""
        self._index.pop(url, None)
        self._errors.pop(url, None)

    def read_refs(self, refs: list[tuple[str, int]]) -> list[RawSample | None]:
        """Samples by (url, index), in the order given; None for one that cannot be read any more (its shard
        vanished, was cut or cannot be opened). A stream is read once for all the samples wanted from it (a resume
        restores a whole shuffle buffer of them), not once per sample."""
        wanted: dict[str, set[int]] = {}
        for url, index in refs:
            wanted.setdefault(url, set()).add(index)
        found: dict[tuple[str, int], RawSample] = {}
        for url, indices in wanted.items():
            problem = "no longer in the shard"
            try:
                with contextlib.closing(self._iterate_sparse(url, sorted(indices))) as samples:
                    for sample in samples:
                        found[url, sample.index] = sample
            except TarShardError as err:
                problem = str(err)
            missing = [i for i in indices if (url, i) not in found]
            if missing:
                log.warning("data: %d buffered sample(s) of %s cannot be read back (%s): counted as lost",
                            len(missing), url, problem)
        # One object per ref: a buffer can hold the same sample twice (the end of one epoch and the start of the
        # next), and each copy gets its own epoch.
        return [None if (url, index) not in found else dataclasses.replace(found[url, index]) for url, index in refs]

    def _iterate_sparse(self, url: str, indices: list[int]) -> Iterator[RawSample]:
        """The samples at sorted `indices` that the shard still holds: seeks in a local shard, one pass over a
        stream. TarShardError when it cannot be read."""
        if not is_remote(url):
            try:
                index = self._local_index(url)
                for i in (i for i in indices if i < len(index)):
                    yield from self._local_range(url, i, i + 1, 1)
            except OSError as err:
                self._forget(url)
                raise TarShardError(f"{url}: {type(err).__name__}: {err}", errors.UNREADABLE_SHARD) from err
            return
        wanted = set(indices)
        with contextlib.closing(self.iterate(url, indices[0])) as samples:
            for sample in samples:
                if sample.index in wanted:
                    yield sample
                if sample.index >= indices[-1]:
                    return

    def iterate(self, url: str, start: int = 0) -> Iterator[RawSample]:
        """Samples from `start` on. Raises TarShardError at the end if the shard was truncated or unreadable."""
        return self.iterate_range(url, start)

    def iterate_range(self, url: str, start: int, stop: int | None = None, step: int = 1) -> Iterator[RawSample]:
        """Samples `range(start, stop, step)` (stop None: to the shard's end). A local shard seeks to each one; a
        stream passes over the others without keeping their bytes. Raises TarShardError at the end as `iterate`,
        and at once for any OSError (a vanished file, EIO, ESTALE, a permission taken away)."""
        if not is_remote(url):
            try:
                yield from self._local_range(url, start, stop, step)
            except OSError as err:
                self._forget(url)
                raise TarShardError(f"{url}: {type(err).__name__}: {err}", errors.UNREADABLE_SHARD) from err
            if self._errors.get(url):
                reason, message = self._errors[url]
                if reason == errors.UNREADABLE_SHARD:
                    self._forget(url)
                raise TarShardError(f"{url}: {message}", reason)
            return
        with contextlib.closing(self._iterate_stream(url, start)) as samples:
            for raw in samples:
                if stop is not None and raw.index >= stop:
                    return
                if (raw.index - start) % step == 0:
                    yield raw

    def _local_range(self, url: str, start: int, stop: int | None, step: int) -> Iterator[RawSample]:
        if not Path(url).is_file():
            raise FileNotFoundError(f"no such shard: {url}")
        index = self._local_index(url)
        end = len(index) if stop is None else min(stop, len(index))
        if start >= end:
            return
        with open(url, "rb") as f:
            for i in range(start, end, step):
                key, parts = index[i]
                data = {}
                for ext, m in parts:
                    f.seek(m.offset)
                    data[ext] = f.read(m.size)
                yield RawSample(key, url, i, data)

    def _iterate_stream(self, url: str, start: int) -> Iterator[RawSample]:
        stream, count = None, 0
        try:
            stream = open_stream(url, self.policy)
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for i, (key, parts) in enumerate(group_members(stream_members(tf, start))):
                    count = i + 1
                    if i >= start:
                        yield RawSample(key, url, i, dict(parts))
            finished, stream = stream, None
            finished.close()  # a pipe's exit status is checked here (webdataset's opener)
            self._whole[0] += count
            self._whole[1] += 1
        except OSError as err:
            raise TarShardError(f"{url}: {err}", errors.UNREADABLE_SHARD) from err
        except (tarfile.TarError, EOFError, ValueError) as err:
            raise TarShardError(f"{url}: {err}") from err
        finally:
            if stream is not None:
                # Stopped early (a resume point, an epoch cap) or failed: a pipe's writer may die of SIGPIPE.
                if not isinstance(stream, RetryingStream):
                    set_options(stream, ignore_errors=True)
                stream.close()


class SourceStream:
    """One source's endless, seeded, resumable sample stream for one slot.

    `epoch_samples`: end this slot's epoch after that many samples (bad ones included) even if its shards go on,
    as webdataset's `with_epoch` does for streams; the next epoch starts over with a new shard order."""

    def __init__(self, urls: list[str], slot: int, n_slots: int, seed: int, source: int, shuffle: bool,
                 reader: ShardReader, state: StreamState | None = None, epoch_samples: int | None = None) -> None:
        if not urls:
            raise ValueError("a data source has no shards")
        self.urls, self.slot, self.n_slots = urls, slot, n_slots
        self.seed, self.source, self.shuffle = seed, source, shuffle
        self.reader = reader
        self.state = state or StreamState()
        self.epoch_samples = epoch_samples
        self._it: Iterator[RawSample] | None = None

    def shards_for(self, epoch: int) -> tuple[list[str], bool]:
        order = list(self.urls)
        if self.shuffle:
            seeded_rng(self.seed, self.source, epoch, "shards").shuffle(order)
        if len(order) >= self.n_slots:
            return order[self.slot :: self.n_slots], False
        return order, True  # sample-level split

    def _rest(self) -> Iterator[RawSample]:
        st = self.state
        while st.rest_pos < len(st.rest):
            piece = st.rest[st.rest_pos]
            first = piece.first_at(st.sample_pos)
            try:
                with contextlib.closing(self.reader.iterate_range(piece.url, first, piece.stop, piece.step)) as samples:
                    for raw in samples:
                        st.sample_pos = raw.index + 1
                        raw.epoch = piece.epoch
                        yield raw
            except TarShardError as err:
                self._lose(err, piece.url, piece.first_at(st.sample_pos), piece.stop, piece.step)
            st.rest_pos, st.sample_pos = st.rest_pos + 1, 0
        st.rest, st.rest_pos = [], 0

    def _samples(self) -> Iterator[RawSample]:
        st = self.state
        yield from self._rest()
        while True:
            shards, by_sample = self.shards_for(st.epoch)
            yielded = False
            while st.shard_pos < len(shards) and not self._epoch_full():
                url = shards[st.shard_pos]
                offset = self._epoch_offset(shards, st.shard_pos) if by_sample else 0
                try:
                    with contextlib.closing(self.reader.iterate(url, st.sample_pos)) as samples:
                        for raw in samples:
                            st.sample_pos = raw.index + 1
                            if by_sample and (offset + raw.index) % self.n_slots != self.slot:
                                continue
                            yielded = True
                            st.taken += 1
                            raw.epoch = st.epoch
                            yield raw
                            if self._epoch_full():
                                break
                except TarShardError as err:
                    if by_sample:  # this slot's samples: every n_slots-th index, shifted by the epoch offset
                        first = st.sample_pos + (self.slot - offset - st.sample_pos) % self.n_slots
                        self._lose(err, url, first, None, self.n_slots)
                    else:
                        self._lose(err, url, st.sample_pos, None, 1)
                st.shard_pos, st.sample_pos = st.shard_pos + 1, 0
            if not yielded and st.shard_pos >= len(shards) and not self._any_readable(shards):
                raise DataSourceError(f"data source {self.source} has no readable samples in {len(shards)} shard(s) "
                                      f"(first: {shards[0] if shards else '-'})")
            st.epoch, st.shard_pos, st.sample_pos, st.taken = st.epoch + 1, 0, 0, 0

    def _lose(self, err: TarShardError, url: str, first: int, stop: int | None, step: int) -> None:
        """Count this slot's samples of a failed shard that it had not read, `range(first, stop, step)` up to the
        shard's expected size (its manifest's count: ShardReader.expected_count), toward data.max_bad_fraction
        under the error's reason; at least 1, also where the size is unknown."""
        expected = self.reader.expected_count(url)
        end = stop if expected is None else expected if stop is None else min(stop, expected)
        lost = max(1, len(range(first, end, step)) if end is not None else 1)
        self.state.lost[err.reason] = self.state.lost.get(err.reason, 0) + lost
        log.warning("data: shard lost, %d sample(s) counted as %s: %s", lost, err.reason, err)

    def _epoch_full(self) -> bool:
        return self.epoch_samples is not None and self.state.taken >= self.epoch_samples

    def _any_readable(self, shards: list[str]) -> bool:
        return any((self.reader.count(u) or 0) > 0 for u in shards if not is_remote(u))

    def _epoch_offset(self, shards: list[str], pos: int) -> int:
        return sum(self.reader.count(u) or 0 for u in shards[:pos])

    def next(self) -> RawSample:
        if self._it is None:
            self._it = self._samples()
        return next(self._it)


class DataSourceError(RuntimeError):
    """A source that cannot deliver samples at all, or whose bad fraction passed data.max_bad_fraction."""


class ShuffleBuffer:
    """A seeded sample shuffle buffer whose contents are saved as references, not bytes."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.items: list[tuple[int, RawSample]] = []

    def push_pop(self, item: tuple[int, RawSample] | None) -> tuple[int, RawSample] | None:
        if item is not None:
            self.items.append(item)
            if len(self.items) < self.size:
                return None
        if not self.items:
            return None
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()

    def overfull(self) -> bool:
        return len(self.items) > self.size

    def refs(self) -> list[tuple[int, str, int]]:
        return [(src, raw.url, raw.index) for src, raw in self.items]

    def epochs(self) -> list[int]:
        return [raw.epoch for _, raw in self.items]
