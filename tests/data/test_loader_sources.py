"""Loader promises: `pipe:` shards read like files and resumed exactly without replaying samples,
sources mixed by weight with an epoch size for streams, and a resume in place given every old rank's state."""

from __future__ import annotations

import json
from itertools import islice

import pytest
from helpers.loading import CountingProcessor, pipe_urls

from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.stream import ShardReader, SourceStream
from pretrain.data.urls import expand_urls


def _spec(sources, **kw) -> LoaderSpec:
    defaults = dict(weights=[1.0] * len(sources), shuffle_buffer=8, rows_per_batch=2, max_length=64)
    return LoaderSpec(sources=sources, **{**defaults, **kw})


def _ids(batch) -> list[tuple]:
    return [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]


@pytest.mark.slow
def test_pipe_urls_read_like_files(processor, shapes):
    files = expand_urls(shapes["train"]["urls"])
    kw = dict(rank=1, world_size=2, num_workers=0)
    local = [_ids(b) for b in islice(ResumableLoader(_spec([files], **kw), processor), 40)]
    piped = [_ids(b) for b in islice(ResumableLoader(_spec([pipe_urls(files)], **kw), processor), 40)]
    assert piped == local


@pytest.mark.slow
@pytest.mark.parametrize("workers, stop_at", [(0, 5), (0, 37), (2, 13)])
def test_pipe_resume_is_exact_and_skips_bytes(processor, shapes, tmp_path, workers, stop_at):
    """Resumed mid-shard: the stream continues exactly; nothing before the resume point is decoded again, and each
    command runs once for the whole restored shuffle buffer, not once per sample."""
    log = tmp_path / "runs.log"
    urls = pipe_urls(expand_urls(shapes["train"]["urls"]), log)
    kw = dict(rank=0, world_size=2, num_workers=workers)
    full = [_ids(b) for b in islice(ResumableLoader(_spec([urls], **kw), processor), stop_at + 4)]
    first = ResumableLoader(_spec([urls], **kw), processor)
    head = [_ids(b) for b in islice(first, stop_at)]
    state = json.loads(json.dumps(first.state_dict()))
    log.unlink()
    CountingProcessor.calls = 0
    tail = [_ids(b) for b in islice(ResumableLoader(_spec([urls], **kw), processor, {0: state}), 4)]
    assert head + tail == full
    if workers == 0:
        pending = sum(len(s["pending"]) for s in state["slots"].values())
        assert CountingProcessor.calls <= pending + 4 * 2  # restored carry-over + the 4 new batches, no replay
        buffered = {url for s in state["slots"].values() for _, url, _ in s["buffer"]}
        assert len(log.read_text().splitlines()) <= len(buffered) + 2


@pytest.mark.slow
def test_mixed_sources_with_stream_epoch_size(processor, shapes):
    """A local source and a `pipe:` source mixed 3:1; data.epoch_size=40 over 2 slots ends each slot's stream
    epoch after 20 samples (the local source keeps its shard-sized epochs), and resume stays exact."""
    files = expand_urls(shapes["train"]["urls"])
    kw = dict(weights=[3.0, 1.0], rank=0, world_size=2, num_workers=0, epoch_size=40, rows_per_batch=4)
    sources = [files[:4], pipe_urls(files[4:])]
    loader = ResumableLoader(_spec(sources, **kw), processor)
    batches = list(islice(loader, 40))
    ok = loader.stats()["ok"]
    assert 0.65 < ok[0] / sum(ok) < 0.85
    streams = loader.slot_states[0].streams
    taken_from_pipe = ok[1] + len([r for r in loader.slot_states[0].buffer if r[0] == 1])
    assert streams[1].epoch * 20 + streams[1].taken == pytest.approx(taken_from_pipe, abs=1)
    assert streams[1].epoch >= 1 and streams[0].epoch == 0  # 160 samples: 2 x 64 local shards not done
    resumed = ResumableLoader(_spec(sources, **kw), processor, {0: _state_after(processor, sources, kw, 23)})
    assert [_ids(b) for b in islice(resumed, 17)] == [_ids(b) for b in batches[23:]]


def _state_after(processor, sources, kw, n: int) -> dict:
    """The state after `n` batches, as it comes back from a checkpoint."""
    loader = ResumableLoader(_spec(sources, **kw), processor)
    list(islice(loader, n))
    return json.loads(json.dumps(loader.state_dict()))


@pytest.mark.slow
def test_stream_epoch_restarts_with_a_new_shard_order(shapes):
    """After its share of epoch_size, a stream's slot starts the next epoch at the first sample of that epoch's
    first shard, not where it was."""
    urls = pipe_urls(expand_urls(shapes["train"]["urls"]))
    stream = SourceStream(urls, 0, 2, seed=3, source=0, shuffle=True, reader=ShardReader(), epoch_samples=20)
    first = [stream.next() for _ in range(20)]
    second = stream.next()
    assert [r.index for r in first] == list(range(20)) and first[0].url == stream.shards_for(0)[0][0]
    assert (second.url, second.index) == (stream.shards_for(1)[0][0], 0)
    assert stream.state.epoch == 1 and stream.state.taken == 1


class _Reads(dict):
    """The old ranks' states by rank, recording which ranks' states were asked for."""

    def __init__(self, states: dict) -> None:
        super().__init__(states)
        self.asked: set[int] = set()

    def __getitem__(self, rank: int) -> dict:
        self.asked.add(rank)
        return super().__getitem__(rank)


def test_every_old_rank_state_resumes_each_rank_in_place_from_its_own(processor, shapes):
    """Same layout: given every old rank's state, each rank continues exactly as from its own alone, and reads
    only its own. States of different layouts are refused where they must be combined."""
    urls = expand_urls(shapes["train"]["urls"])
    kw = dict(world_size=2, num_workers=0)
    loaders = [ResumableLoader(_spec([urls], rank=r, **kw), processor) for r in range(2)]
    for loader in loaders:
        list(islice(loader, 7))
    states = {r: json.loads(json.dumps(loader.state_dict())) for r, loader in enumerate(loaders)}
    for rank in range(2):
        own = [_ids(b) for b in islice(ResumableLoader(_spec([urls], rank=rank, **kw), processor,
                                                       {rank: states[rank]}), 3)]
        every = _Reads(states)
        from_every = ResumableLoader(_spec([urls], rank=rank, **kw), processor, every)
        assert [_ids(b) for b in islice(from_every, 3)] == own
        assert set(from_every.slot_states) == {rank} and every.asked == {rank}
    with pytest.raises(ValueError, match="of different layouts"):
        ResumableLoader(_spec([urls], rank=0, world_size=1), processor, {0: states[0], 1: {**states[1], "seed": 4}})
