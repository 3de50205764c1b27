"""The loader: deterministic split over ranks and workers, exact resume, and bad samples skipped and counted."""

from __future__ import annotations

import hashlib
import json
import tarfile
from itertools import islice

import pytest
from helpers.shards import write_tar

from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.urls import expand_urls


def _loader(processor, urls, states=None, **spec):
    defaults = dict(sources=[expand_urls(urls)], weights=[1.0], shuffle_buffer=8, rows_per_batch=2, max_length=64)
    return ResumableLoader(LoaderSpec(**{**defaults, **spec}), processor, states)


def _ids(batch) -> list[tuple]:
    return [tuple(row.tolist()) for row in batch["input_ids"]]


def _fingerprint(input_ids, pixel_values) -> str:
    """A sample's identity as the model sees it: its tokens and its pixels."""
    h = hashlib.sha256(bytes(str([t for t in input_ids if t != 0]), "ascii"))
    h.update(pixel_values.numpy().tobytes())
    return h.hexdigest()


def _keys_by_fingerprint(processor, urls) -> dict[str, str]:
    """Every sample of the shards, read with tarfile (not the loader), by its processed fingerprint."""
    out = {}
    for url in expand_urls(urls):
        with tarfile.open(url) as tf:
            samples: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(f"{url}:{key}", {})[ext] = tf.extractfile(m).read()
        for key, parts in samples.items():
            s = processor(parts)
            out[_fingerprint(s.input_ids, s.pixel_values)] = key
    return out


@pytest.mark.slow
def test_ranks_and_workers_cover_an_epoch_once(processor, shapes):
    """2 ranks x 2 workers, one epoch each: the sample keys they read are disjoint and together the whole set."""
    urls = shapes["train"]["urls"]  # 8 shards x 64 samples
    by_print = _keys_by_fingerprint(processor, urls)
    assert len(by_print) == 512  # fingerprints tell every sample apart, so keys can be recovered from batches
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        loader = _loader(processor, urls, rank=rank, world_size=2, num_workers=2, shuffle=False, rows_per_batch=8)
        batches = list(islice(loader, 512 // 8 // 2))  # one epoch of this rank
        seen[rank] = [by_print[_fingerprint(ids.tolist(), px)] for b in batches
                      for ids, px in zip(b["input_ids"], b["pixel_values"], strict=True)]
        assert all(s.streams[0].epoch == 0 or s.streams[0].shard_pos == 0 for s in loader.slot_states.values())
        assert sum(sum(s.ok) for s in loader.slot_states.values()) == 256
    assert len(seen[0]) == len(seen[1]) == 256
    assert len(set(seen[0])) == 256 and len(set(seen[1])) == 256  # no worker repeats another's samples
    assert not set(seen[0]) & set(seen[1])  # no rank reads another's
    assert set(seen[0]) | set(seen[1]) == set(by_print.values())  # and none is left out


def test_shuffle_is_seeded(processor, shapes):
    a = [_ids(b) for b in islice(_loader(processor, shapes["train"]["urls"], seed=1), 5)]
    b = [_ids(b) for b in islice(_loader(processor, shapes["train"]["urls"], seed=1), 5)]
    c = [_ids(b) for b in islice(_loader(processor, shapes["train"]["urls"], seed=2), 5)]
    assert a == b and a != c


@pytest.mark.parametrize("workers, packing, stop_at", [(0, False, 3), (0, False, 37), (2, False, 5), (2, False, 40),
                                                        (0, True, 9), (2, True, 14)])
@pytest.mark.slow
def test_exact_resume(processor, shapes, workers, packing, stop_at):
    """Stop after `stop_at` batches (mid-shard, across shard and epoch boundaries), resume from the state: the
    stream continues exactly as the uninterrupted one."""
    urls = shapes["train"]["urls"]
    kw = dict(num_workers=workers, packing=packing, rank=1, world_size=2)
    full = [_ids(b) for b in islice(_loader(processor, urls, **kw), stop_at + 6)]
    first = _loader(processor, urls, **kw)
    head_batches = list(islice(first, stop_at))
    head = [_ids(b) for b in head_batches]
    state = json.loads(json.dumps(first.state_dict()))  # as it travels through a checkpoint
    tail = [_ids(b) for b in islice(_loader(processor, urls, states={1: state}, **kw), 6)]  # rank 1's own
    assert head == full[:stop_at]
    assert tail == full[stop_at:]
    if packing:
        assert all(b["packed"] for b in head_batches)  # rows really held several samples
        assert any(s.pending for s in first.slot_states.values())  # and a sample was carried over


def test_bad_samples_are_skipped_and_counted(processor, shapes, tmp_path):
    good = tarfile.open(expand_urls(shapes["val"]["urls"])[0])
    members = {m.name: good.extractfile(m).read() for m in good.getmembers()}
    png = next(v for k, v in members.items() if k.endswith(".png"))
    cap = json.dumps({"caption": "one red circle in the center."}).encode()
    samples = [
        ("ok0", {"png": png, "json": cap}),
        ("corrupt", {"png": b"these bytes are no image at all", "json": cap}),
        ("truncated", {"png": png[: len(png) // 2], "json": cap}),
        ("nojson", {"png": png, "json": b"{not json"}),
        ("badutf", {"png": png, "txt": b"\xff\xfe caption"}),
        ("notext", {"png": png}),
        ("noimage", {"json": cap}),
        ("svg", {"svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "json": cap}),
        ("empty", {"png": png, "json": json.dumps({"caption": " "}).encode()}),
        ("ok1", {"png": png, "txt": b"two blue squares on the left."}),
    ]
    write_tar(tmp_path / "bad.tar", samples)
    loader = _loader(processor, str(tmp_path / "bad.tar"), shuffle=False, rows_per_batch=2)
    next(iter(loader))
    stats = loader.stats()
    assert stats["ok"] == [2]
    assert stats["skipped"][0] == {"corrupt_image": 1, "truncated_image": 1, "bad_json": 1, "bad_utf8": 1,
                                   "missing_text": 1, "missing_image": 1, "unsupported_image_format": 1,
                                   "empty_text": 1}


def test_truncated_tar_counts_and_continues(processor, shapes, tmp_path):
    src = expand_urls(shapes["train"]["urls"])[0]
    data = open(src, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    loader = _loader(processor, [str(tmp_path / "cut.tar"), src], shuffle=False, rows_per_batch=4)
    batches = list(islice(loader, 30))  # beyond one epoch: the cut shard is read again each epoch
    stats = loader.stats()
    assert len(batches) == 30 and stats["skipped"][0].get("truncated_tar", 0) >= 1
    assert 64 < stats["ok"][0] < 3 * 64


def test_weighted_mixing_follows_weights(processor, shapes):
    urls = expand_urls(shapes["train"]["urls"])
    loader = ResumableLoader(LoaderSpec(sources=[urls[:4], urls[4:]], weights=[3.0, 1.0], shuffle_buffer=4,
                                        rows_per_batch=8, max_length=64), processor)
    list(islice(loader, 25))
    ok = loader.stats()["ok"]
    assert 0.65 < ok[0] / sum(ok) < 0.85


def test_missing_shards_are_an_error(processor, tmp_path):
    loader = _loader(processor, str(tmp_path / "nothing-{000..001}.tar"))
    with pytest.raises(RuntimeError, match="no readable samples"):
        next(iter(loader))
