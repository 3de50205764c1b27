"""Elastic resume in the loader: the rest of an epoch split over other ranks x workers, exactly, cheaply."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest
from helpers.loading import CountingProcessor, pipe_urls

from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.stream import ShardReader
from pretrain.data.urls import expand_urls


def _spec(sources, rank, world, workers, **kw) -> LoaderSpec:
    base = dict(weights=[3.0, 1.0, 1.0][:len(sources)], shuffle_buffer=8, rows_per_batch=2, max_length=64,
                packing=True)
    return LoaderSpec(sources=sources, rank=rank, world_size=world, num_workers=workers, **{**base, **kw})


def _run(processor, sources, world, workers, batches, states=None, **kw) -> tuple[list[dict], dict[int, dict]]:
    """Every rank of a layout for `batches` batches: the keys trained on and every rank's state after, by rank."""
    keys, states_after = [], {}
    for rank in range(world):
        loader = ResumableLoader(_spec(sources, rank, world, workers, **kw), processor, states)
        for batch in islice(loader, batches):
            keys += batch["sample_keys"]
        states_after[rank] = json.loads(json.dumps(loader.state_dict()))  # as it travels through a checkpoint
    return keys, states_after


def _epoch(keys: list[dict], epoch: int, source: int | None = None) -> Counter:
    return Counter((k["source"], k["shard"].removeprefix("pipe:cat "), k["key"]) for k in keys
                   if k["epoch"] == epoch and source in (None, k["source"]))


def _all(sources) -> Counter:
    reader = ShardReader()
    return Counter((i, url.removeprefix("pipe:cat "), key) for i, urls in enumerate(sources) for url in urls
                   for key, _ in reader._local_index(url.removeprefix("pipe:cat ")))


@pytest.fixture(scope="module")
def sources(shapes):
    urls = expand_urls(shapes["train"]["urls"])
    return [urls[:5], pipe_urls(urls[5:6])]  # 5 local shards (split by shard, then by sample) and a stream of one


@pytest.mark.slow
def test_rest_of_the_epoch_is_split_exactly_over_other_layouts(processor, sources):
    """2 ranks x 2 workers stop mid-epoch; resumed on 1 x 0 and on 3 x 1, and 3 x 1 stopped again mid-rest and
    resumed on 2 x 0: each chain trains every sample of the epoch of both sources exactly once."""
    head, states = _run(processor, sources, 2, 2, 7)
    assert 0 < sum(_epoch(head, 0).values()) < 384 / 2  # stopped mid-epoch
    for world, workers in [(1, 0), (3, 1)]:
        tail, _ = _run(processor, sources, world, workers, 220 // world, states)
        assert _epoch(head + tail, 0) == _all(sources), (world, workers)
        assert max(_epoch(head + tail, 1).values()) == 1
    middle, again = _run(processor, sources, 3, 1, 8, states)
    # stopped inside the rest
    assert any(s["streams"][0]["rest"] for state in again.values() for s in state["slots"].values())
    tail, _ = _run(processor, sources, 2, 0, 120, again)
    assert _epoch(head + middle + tail, 0) == _all(sources)


@pytest.mark.slow
def test_resume_decodes_no_skipped_sample_and_follows_weights(processor, sources):
    """The resumed loader decodes only what it trains on (plus the carried-over sample); the weights still hold
    after the change."""
    _, states = _run(processor, sources, 2, 2, 7)
    loader = ResumableLoader(_spec(sources, 0, 1, 0), processor, states)
    CountingProcessor.calls = 0
    first = next(iter(loader))
    assert CountingProcessor.calls <= first["n_samples"] + 1
    keys = [k for b in islice(iter(loader), 30) for k in b["sample_keys"]]
    share = sum(k["source"] == 0 for k in keys) / len(keys)
    assert 0.6 < share < 0.9, share


@pytest.mark.slow
def test_changed_batching_and_an_added_source_keep_the_epoch(processor, sources, shapes, caplog):
    """Same ranks and workers but another micro-batch size, and a third source: the old sources' epoch still
    completes exactly once; the new source starts at its first epoch."""
    head, states = _run(processor, sources, 1, 0, 9, rows_per_batch=3)
    added = [*sources, expand_urls(shapes["train"]["urls"])[7:8]]
    tail, _ = _run(processor, added, 1, 0, 260, states)
    assert "the rest of the interrupted epoch is split" in caplog.text and "source 2" in caplog.text
    assert _epoch(head + tail, 0, 0) + _epoch(head + tail, 0, 1) == _all(sources)
    assert max(_epoch(tail, 0, 2).values()) == 1 and len(_epoch(tail, 0, 2)) > 0


@pytest.mark.slow
def test_a_slot_that_never_handed_out_a_batch_counts_as_unstarted(processor, sources):
    """A checkpoint after one batch of 2 ranks x 2 workers holds only the slots that delivered; resumed on 1 x 0,
    the others' whole shares are part of the rest."""
    head, states = _run(processor, sources, 2, 2, 1)
    assert sum(len(s["slots"]) for s in states.values()) < 4
    tail, _ = _run(processor, sources, 1, 0, 240, states)
    assert _epoch(head + tail, 0) == _all(sources)
