"""Loader promises: `pipe:` shards read like files and resumed exactly without replaying samples,
sources mixed by weight with an epoch size for streams, and the world-size-change rule of checkpoints written before
elastic resume (pretrain.data.elastic)."""

from __future__ import annotations

import io
import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from helpers.loading import CountingProcessor, pipe_urls
from PIL import Image

from pretrain.data.loader import LoaderSpec, ResumableLoader, merge_states
from pretrain.data.stream import ShardReader, SourceStream
from pretrain.data.urls import expand_urls
from pretrain.shards.writer import ShardWriter


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """5 shards of 30, 2, 30, 2, 30 samples, every caption unique ("item i of shard s")."""
    out = tmp_path_factory.mktemp("uneven")
    paths = []
    for s, n in enumerate((30, 2, 30, 2, 30)):
        with ShardWriter(out / f"s{s}", samples_per_shard=1000) as w:
            for i in range(n):
                w.write({"__key__": f"s{s}-{i:04d}", "png": _png(100 * s + i),
                         "json": json.dumps({"caption": f"item {i} of shard {s}"})})
        paths.append(str(out / f"s{s}" / "shard-000000.tar"))
    return paths


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
    tail = [_ids(b) for b in islice(ResumableLoader(_spec([urls], **kw), processor, state), 4)]
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
    resumed = ResumableLoader(_spec(sources, **kw), processor, _state_after(processor, sources, kw, 23))
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


def _take_epoch(loader: ResumableLoader, n: int) -> list[tuple]:
    seen: list[tuple] = []
    for batch in loader:
        seen += _ids(batch)
        if len(seen) >= n:
            return seen
    raise AssertionError("loader ended")


def _as_written_before_elastic_resume(state: dict) -> dict:
    """A loader state as checkpoints held it before the epoch order was global: no format, layout or epochs."""
    old = {k: state[k] for k in ("world_size", "num_workers", "consumed", "slots")}
    for slot in old["slots"].values():
        for key in ("buffer_epochs", "pending_epochs"):
            slot.pop(key)
        for stream in slot["streams"]:
            stream.pop("rest"), stream.pop("rest_pos")
    return old


def test_world_size_change_sees_the_next_epoch_once(processor, uneven, caplog):
    """A checkpoint written before elastic resume, 2 ranks -> 3 ranks: the old rule, with a warning. The old slots
    drifted apart (one is epochs ahead: shards hold 30 or 2 samples); the merged state restarts every new slot at
    1 + the furthest old epoch, and the new slots together deliver that epoch's samples exactly once."""
    old = dict(world_size=2, num_workers=0, shuffle=False, rows_per_batch=1)
    states = []
    for rank in range(2):
        loader = ResumableLoader(_spec([uneven], rank=rank, **old), processor)
        list(islice(loader, 20))
        states.append(_as_written_before_elastic_resume(json.loads(json.dumps(loader.state_dict()))))
    epochs = [s["streams"][0]["epoch"] for st in states for s in st["slots"].values()]
    assert max(epochs) >= 2 and min(epochs) == 0  # drifted: rank 0's state alone would restart at epoch 1
    merged = merge_states(states)

    new = dict(world_size=3, num_workers=0, shuffle=True, shuffle_buffer=1, rows_per_batch=1)
    seen: list[tuple] = []
    for rank in range(3):
        loader = ResumableLoader(_spec([uneven], rank=rank, **new), processor, merged)
        slot = loader.slot_states[rank]
        assert slot.streams[0].epoch == max(epochs) + 1
        stream = SourceStream(uneven, rank, 3, 0, 0, True, ShardReader())
        share = sum(ShardReader().count(u) for u in stream.shards_for(max(epochs) + 1)[0])
        seen += _take_epoch(loader, share) if share else []
    every = [tuple(processor(raw.parts).input_ids) for u in uneven for raw in ShardReader().iterate(u)]
    assert Counter(seen) == Counter(every)
    assert "predates elastic resume" in caplog.text


def test_merged_state_resumes_each_rank_exactly(processor, shapes):
    """Same world size: a merged state is as good as each rank's own (each keeps only its slots)."""
    urls = expand_urls(shapes["train"]["urls"])
    kw = dict(world_size=2, num_workers=0)
    loaders = [ResumableLoader(_spec([urls], rank=r, **kw), processor) for r in range(2)]
    for loader in loaders:
        list(islice(loader, 7))
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    merged = merge_states(states)
    for rank in range(2):
        own = [_ids(b) for b in islice(ResumableLoader(_spec([urls], rank=rank, **kw), processor, states[rank]), 3)]
        from_merged = ResumableLoader(_spec([urls], rank=rank, **kw), processor, merged)
        assert [_ids(b) for b in islice(from_merged, 3)] == own
        assert set(from_merged.slot_states) == {rank}
    with pytest.raises(ValueError, match="different world sizes"):
        merge_states([states[0], {**states[1], "world_size": 4}])
