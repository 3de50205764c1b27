"""Vision-aware packing (data.max_images_per_batch) and exact resume with multi-image and interleaved samples."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest
import torch
from helpers.shards import image_bytes, write_tar
from transformers import AutoImageProcessor

from pretrain.data.batching import Batcher, vision_cost
from pretrain.data.image import ImageTransform
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.sample import ProcessedSample, SampleProcessor
from pretrain.data.text import TextProcessor

BUDGET = 3


def _sample(images: int, length: int = 10) -> ProcessedSample:
    pixels = None if images == 0 else torch.zeros(images, 3, 2, 2)
    return ProcessedSample([1] * length, [1] * length, pixels, image_tiles=[1] * images)


def test_vision_cost_counts_tiles():
    assert [vision_cost(_sample(n)) for n in (0, 1, 2, 5)] == [0, 1, 2, 5]


@pytest.mark.parametrize("packing", [False, True])
def test_no_batch_passes_the_image_budget(packing):
    costs = [1, 2, 0, 3, 1, 1, 1, 0, 2, 2, 3, 0, 0, 1, 2, 1, 3, 0, 1, 1]
    batcher = Batcher(rows_per_batch=3, max_length=25, packing=packing, max_images=BUDGET)
    batches = []
    for i, cost in enumerate(costs):
        batch = batcher.push((i, cost), length=10, images=cost)
        if batch is not None:
            batches.append(batch)
    items = [item for batch in batches for row in batch for item in row]
    held = batcher.pending()
    assert [i for i, _ in items + held] == list(range(len(costs)))  # every sample once, in order
    assert all(sum(c for row in b for _, c in row) <= BUDGET for b in batches)
    # The budget, not the rows, ended some batches: the case occurred.
    short = [b for b in batches if len(b) < 3]
    assert short and all(sum(c for row in b for _, c in row) + _next_cost(b, items, costs) > BUDGET for b in short)
    unlimited = Batcher(rows_per_batch=3, max_length=25, packing=packing)
    full = [b for i, c in enumerate(costs) if (b := unlimited.push((i, c), 10, c)) is not None]
    assert all(len(b) == 3 for b in full) and any(sum(c for row in b for _, c in row) > BUDGET for b in full)


def _next_cost(batch, items, costs) -> int:
    last = batch[-1][-1][0]
    return costs[last + 1] if last + 1 < len(costs) else 0


@pytest.fixture(scope="module")
def processor(tokenizer, assets):
    text = TextProcessor(tokenizer, tokenizer.convert_tokens_to_ids("<image>"), image_tokens=16, max_length=128)
    image = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(assets["clip"]))
    return SampleProcessor(text, image, max_image_pixels=10**7)


def _doc(n_images: int, i: int) -> dict[str, bytes]:
    texts, images, parts = [], [], {}
    for k in range(n_images):
        texts += [f"p{k}.", None]
        images += [None, f"img{k}.png"]
        parts[f"{k}.png"] = image_bytes("PNG", size=(30 + k, 20), seed=100 * i + k)
    texts.append(f"end {i}.")
    images.append(None)
    return {"json": json.dumps({"texts": texts, "images": images}).encode(), **parts}


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> tuple[list[str], int]:
    """Captions (1 image), interleaved documents with 0-4 images; the 4-image ones pass the budget."""
    root = tmp_path_factory.mktemp("mixed")
    urls, too_many = [], 0
    for shard in range(3):
        samples = []
        for j in range(12):
            i = shard * 12 + j
            if j % 3 == 0:
                samples.append((f"cap{i:03d}", {"png": image_bytes("PNG", seed=i), "txt": f"caption {i}.".encode()}))
            else:
                n = (i * 7) % 5
                too_many += n > BUDGET
                samples.append((f"doc{i:03d}", _doc(n, i)))
        urls.append(str(write_tar(root / f"mixed-{shard:06d}.tar", samples)))
    return urls, too_many


def _loader(processor, urls, states=None, **kw):
    spec = LoaderSpec(sources=[urls], weights=[1.0], shuffle_buffer=6, rows_per_batch=2, max_length=128,
                      max_images_per_batch=BUDGET, **kw)
    return ResumableLoader(spec, processor, states)


def _view(batch) -> tuple:
    return (tuple(tuple(r) for r in batch["input_ids"].tolist()), tuple(k["key"] for k in batch["sample_keys"]),
            None if batch["pixel_values"] is None else float(batch["pixel_values"].sum()))


@pytest.mark.parametrize("packing", [True, False])
def test_exact_resume_with_documents_under_the_budget(processor, mixed_shards, packing):
    urls, too_many = mixed_shards
    kw = dict(packing=packing, seed=3)
    full = list(islice(_loader(processor, urls, **kw), 30))
    # Stop right after a batch the budget ended early: the sample that did not fit is held over the resume.
    stop_at = next(i for i, b in enumerate(full) if i >= 2 and len(b["sample_lengths"]) < 2) + 1
    full = full[: stop_at + 6]
    first = _loader(processor, urls, **kw)
    head = [_view(b) for b in islice(first, stop_at)]
    state = json.loads(json.dumps(first.state_dict()))  # as it travels through a checkpoint
    tail = [_view(b) for b in islice(_loader(processor, urls, states={0: state}, **kw), 6)]
    assert head + tail == [_view(b) for b in full]
    costs = [0 if b["pixel_values"] is None else b["pixel_values"].shape[0] for b in full]
    assert max(costs) <= BUDGET and max(costs) >= 2  # bounded, and multi-image samples were in it
    assert any(k["key"].startswith("doc") for b in full for k in b["sample_keys"])
    assert any(s.pending for s in first.slot_states.values())  # a sample was carried over the cut
    assert state["batching"][-1] == BUDGET
    # One epoch: each document with more images than the budget skipped and counted.
    epoch = _loader(processor, urls, single_pass=True, **kw)
    list(epoch)
    stats = epoch.stats()
    assert too_many > 0 and stats["skipped"][0] == {"too_many_images": too_many}
    assert stats["ok"][0] == 36 - too_many


def test_elastic_resume_with_documents_under_the_budget(processor, mixed_shards):
    """2 ranks stop mid-epoch with documents in their batchers; resumed on 1 rank, every usable sample of the epoch
    is trained exactly once and no batch passes the budget."""
    urls, too_many = mixed_shards
    head, states = [], []
    for rank in range(2):
        loader = _loader(processor, urls, packing=True, rank=rank, world_size=2)
        for batch in islice(loader, 3):
            head += batch["sample_keys"]
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert any(slot["pending"] for s in states for slot in s["slots"].values())  # carried samples to hand over
    tail = []
    for batch in islice(_loader(processor, urls, states=dict(enumerate(states)), packing=True), 30):
        assert batch["pixel_values"] is None or batch["pixel_values"].shape[0] <= BUDGET
        tail += batch["sample_keys"]
    epoch0 = Counter(k["key"] for k in head + tail if k["epoch"] == 0)
    assert set(epoch0.values()) == {1} and len(epoch0) == 36 - too_many
    assert any(k.startswith("doc") for k in epoch0) and max(k["epoch"] for k in tail) >= 1  # past the epoch
