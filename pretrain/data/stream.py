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
import hashlib
import json
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from webdataset.gopen import set_options

from pretrain.data import errors
from pretrain.data.urls import MANIFEST_NAME, is_remote

# webdataset's key rule: the key is the path up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


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
    """A shard that ended early or could not be opened; its remaining samples are lost and counted."""


@dataclass
class _Member:
    name: str
    offset: int
    size: int


def _group(members: Iterator[tuple[str, object]]) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """Consecutive members sharing a key form a sample (webdataset's group_by_keys)."""
    key, group = None, []
    for name, payload in members:
        m = _KEY_EXT.match(name)
        if not m:
            continue
        k, ext = m.group(1), m.group(2)
        if key is not None and k != key:
            yield key, group
            group = []
        key = k
        group.append((ext.lower(), payload))
    if key is not None:
        yield key, group


def _stream_members(tf: tarfile.TarFile, start: int) -> Iterator[tuple[str, bytes | None]]:
    """Members of a tar read as a stream, with their data read at once (a stream cannot seek back to it later);
    members of samples before `start` are passed over unread: tarfile skips their bytes without keeping them."""
    key, index = None, -1
    for info in tf:
        m = _KEY_EXT.match(info.name) if info.isfile() else None
        if not m:
            continue
        if m.group(1) != key:
            key, index = m.group(1), index + 1
        yield info.name, tf.extractfile(info).read() if index >= start else None


def _size(path: str) -> int:
    return Path(path).stat().st_size


def _truncation(path: str, members: list[_Member]) -> str | None:
    """Reading headers alone seeks past a cut: check that the data fits the file and the end-of-archive block
    follows the last member, as every complete tar has."""
    size = _size(path)
    if not members:
        return None if size >= 1024 else "truncated: no end-of-archive marker"
    last = members[-1]
    end = last.offset + -(-last.size // 512) * 512
    if last.offset + last.size > size:
        return f"truncated: member {last.name} ends past the end of the file"
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(512)
    if len(block) < 512 or block.strip(b"\0"):
        return "truncated: no end-of-archive marker after the last member"
    return None


class ShardReader:
    """Reads one worker's shards; keeps an index per local shard for seeks."""

    def __init__(self) -> None:
        self._index: dict[str, list[tuple[str, list[tuple[str, _Member]]]]] = {}
        self._errors: dict[str, str | None] = {}
        self._manifests: dict[Path, dict[str, tuple[int, int]]] = {}

    def _local_index(self, url: str) -> list[tuple[str, list[tuple[str, _Member]]]]:
        if url not in self._index:
            members, error = [], None
            try:
                with tarfile.open(url, "r:") as tf:
                    for info in tf:
                        if info.isfile():
                            members.append((info.name, _Member(info.name, info.offset_data, info.size)))
            except (tarfile.TarError, OSError, EOFError) as err:
                error = str(err)
            error = error or _truncation(url, [m for _, m in members])
            size = _size(url) if members else 0  # once per shard, not per member
            index = list(_group(iter(m for m in members if m[1].offset + m[1].size <= size)))
            if error and index:
                index = index[:-1]  # the last sample before the cut may be missing parts
            self._index[url] = index
            self._errors[url] = error
        return self._index[url]

    def count(self, url: str) -> int | None:
        return None if is_remote(url) else len(self._local_index(url))

    def listed_count(self, url: str) -> int | None:
        """A local shard's sample count without reading it: from its directory's manifest.json when that lists the
        shard with its current size in bytes, else from its tar headers (`count`)."""
        if is_remote(url):
            return None
        if url in self._index:
            return len(self._index[url])
        path = Path(url)
        if path.parent not in self._manifests:
            try:
                listed = json.loads((path.parent / MANIFEST_NAME).read_text())["shards"]
                self._manifests[path.parent] = {s["url"]: (int(s["samples"]), int(s["bytes"])) for s in listed}
            except (OSError, ValueError, KeyError, TypeError):
                self._manifests[path.parent] = {}
        samples, size = self._manifests[path.parent].get(path.name, (None, None))
        if samples is not None and path.is_file() and _size(url) == size:
            return samples
        return self.count(url)

    def read_at(self, url: str, index: int) -> RawSample:
        if is_remote(url):
            for sample in self.iterate(url, index):
                return sample
            raise TarShardError(f"{url}: sample {index} not found")
        key, parts = self._local_index(url)[index]
        with open(url, "rb") as f:
            data = {}
            for ext, m in parts:
                f.seek(m.offset)
                data[ext] = f.read(m.size)
        return RawSample(key, url, index, data)

    def read_refs(self, refs: list[tuple[str, int]]) -> list[RawSample]:
        """Samples by (url, index), in the order given. A stream is read once for all the samples wanted from it
        (a resume restores a whole shuffle buffer of them), not once per sample."""
        wanted: dict[str, set[int]] = {}
        for url, index in refs:
            if is_remote(url):
                wanted.setdefault(url, set()).add(index)
        found: dict[tuple[str, int], RawSample] = {}
        for url, indices in wanted.items():
            with contextlib.closing(self.iterate(url, min(indices))) as samples:
                for sample in samples:
                    if sample.index in indices:
                        found[url, sample.index] = sample
                    if sample.index >= max(indices):
                        break
        missing = [ref for ref in refs if ref[0] in wanted and tuple(ref) not in found]
        if missing:
            raise TarShardError(f"{missing[0][0]}: sample {missing[0][1]} not found")
        return [found[url, index] if url in wanted else self.read_at(url, index) for url, index in refs]

    def iterate(self, url: str, start: int = 0) -> Iterator[RawSample]:
        """Samples from `start` on. Raises TarShardError at the end if the shard was truncated or unreadable."""
        return self.iterate_range(url, start)

    def iterate_range(self, url: str, start: int, stop: int | None = None, step: int = 1) -> Iterator[RawSample]:
        """Samples `range(start, stop, step)` (stop None: to the shard's end). A local shard seeks to each one; a
        stream passes over the others without keeping their bytes. Raises TarShardError at the end as `iterate`."""
        if not is_remote(url):
            if not Path(url).is_file():
                raise TarShardError(f"{url}: no such shard")
            index = self._local_index(url)
            end = len(index) if stop is None else min(stop, len(index))
            with open(url, "rb") as f:
                for i in range(start, end, step):
                    key, parts = index[i]
                    data = {}
                    for ext, m in parts:
                        f.seek(m.offset)
                        data[ext] = f.read(m.size)
                    yield RawSample(key, url, i, data)
            if self._errors.get(url):
                raise TarShardError(f"{url}: {self._errors[url]}")
            return
        with contextlib.closing(self._iterate_stream(url, start)) as samples:
            for raw in samples:
                if stop is not None and raw.index >= stop:
                    return
                if (raw.index - start) % step == 0:
                    yield raw

    def _iterate_stream(self, url: str, start: int) -> Iterator[RawSample]:
        stream = None
        try:
            stream = wds.gopen(url, "rb")
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for i, (key, parts) in enumerate(_group(_stream_members(tf, start))):
                    if i >= start:
                        yield RawSample(key, url, i, dict(parts))
            finished, stream = stream, None
            finished.close()  # a pipe's exit status is checked here
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise TarShardError(f"{url}: {err}") from err
        finally:
            if stream is not None:
                # Stopped early (a resume point, an epoch cap) or failed: a pipe's writer may die of SIGPIPE.
                set_options(stream, ignore_errors=True)
                stream.close()


@dataclass
class StreamState:
    epoch: int = 0
    shard_pos: int = 0  # index into this slot's shard list of the epoch
    sample_pos: int = 0  # next sample index within that shard
    taken: int = 0  # samples this slot took in this epoch (counted against `epoch_samples`)
    lost: dict[str, int] = field(default_factory=dict)
    # After a resume on other slots: this slot's part of the interrupted epoch(s), read before `epoch` starts.
    # Each piece is [epoch, url, start, stop, step] (stop None: to the shard's end); sample_pos is the next index
    # to read within piece `rest_pos`.
    rest: list[list] = field(default_factory=list)
    rest_pos: int = 0


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
            epoch, url, start, stop, step = st.rest[st.rest_pos]
            first = start + max(0, -(-(st.sample_pos - start) // step)) * step
            try:
                with contextlib.closing(self.reader.iterate_range(url, first, stop, step)) as samples:
                    for raw in samples:
                        st.sample_pos = raw.index + 1
                        raw.epoch = epoch
                        yield raw
            except TarShardError:
                st.lost[errors.TRUNCATED_TAR] = st.lost.get(errors.TRUNCATED_TAR, 0) + 1
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
                except TarShardError:
                    st.lost[errors.TRUNCATED_TAR] = st.lost.get(errors.TRUNCATED_TAR, 0) + 1
                st.shard_pos, st.sample_pos = st.shard_pos + 1, 0
            if not yielded and st.shard_pos >= len(shards) and not self._any_readable(shards):
                raise DataSourceError(f"data source {self.source} has no readable samples in {len(shards)} shard(s) "
                                      f"(first: {shards[0] if shards else '-'})")
            st.epoch, st.shard_pos, st.sample_pos, st.taken = st.epoch + 1, 0, 0, 0

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
