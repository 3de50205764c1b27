"""Clips in the loader: frames count against data.max_images_per_batch, and exact and elastic resume keep working
with clips held in the batchers over the cut (the frames are decoded again by seeking: the same pixels)."""

from __future__ import annotations

import copy
import json
from collections import Counter
from itertools import islice

import pytest
from helpers.clips import make_clip
from helpers.shards import image_bytes, write_tar
from transformers import AutoImageProcessor

from pretrain.data.image import ImageTransform
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.sample import SampleProcessor, VideoSampling
from pretrain.data.text import TextProcessor
from pretrain.data.video import FrameTransform
from pretrain.tokens import VIDEO_TOKEN

BUDGET = 4  # tiles + frames per micro-batch; a clip gives up to 3 frames


@pytest.fixture(scope="module")
def processor(tokenizer, assets) -> SampleProcessor:
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    text = TextProcessor(tok, tok.convert_tokens_to_ids("<image>"), image_tokens=16, max_length=256,
                         video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN))
    clip_processor = AutoImageProcessor.from_pretrained(assets["clip"])
    video = VideoSampling(3, None, FrameTransform(clip_processor), tokens_per_frame=4)
    return SampleProcessor(text, ImageTransform.from_processor(clip_processor), max_image_pixels=10**7, video=video)


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory) -> list[str]:
    """Clips of 1-9 frames (1-3 sampled) and one-image captions, in 3 shards."""
    root = tmp_path_factory.mktemp("clips")
    urls = []
    for shard in range(3):
        samples = []
        for j in range(8):
            i = shard * 8 + j
            media = {"mp4": make_clip(frames=1 + i % 9, width=40, height=32)} if j % 2 else {
                "png": image_bytes("PNG", seed=i)}
            samples.append((f"s{i:03d}", {**media, "txt": f"caption {i}.".encode()}))
        urls.append(str(write_tar(root / f"clips-{shard:06d}.tar", samples)))
    return urls


def _loader(processor, urls, states=None, **kw):
    spec = LoaderSpec(sources=[urls], weights=[1.0], shuffle_buffer=6, rows_per_batch=2, max_length=256,
                      max_images_per_batch=BUDGET, **kw)
    return ResumableLoader(spec, processor, states)


def _cost(batch) -> int:
    return sum(batch["video_frames"]) + (0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0])


def _view(batch) -> tuple:
    frames = batch["video_pixels"]
    return (tuple(tuple(r) for r in batch["input_ids"].tolist()), tuple(k["key"] for k in batch["sample_keys"]),
            tuple(batch["video_frames"]), None if frames is None else float(frames.sum()))


def test_exact_resume_with_clips_under_the_budget(processor, clip_shards):
    kw = dict(packing=True, seed=5)
    full = list(islice(_loader(processor, clip_shards, **kw), 16))
    assert max(_cost(b) for b in full) <= BUDGET and any(b["video_frames"] for b in full)
    stop_at = next(i for i, b in enumerate(full) if i >= 2 and b["video_frames"]) + 1
    first = _loader(processor, clip_shards, **kw)
    head = [_view(b) for b in islice(first, stop_at)]
    state = json.loads(json.dumps(first.state_dict()))
    tail = [_view(b) for b in islice(_loader(processor, clip_shards, states={0: state}, **kw), 16 - stop_at)]
    assert head + tail == [_view(b) for b in full]


def test_elastic_resume_with_clips(processor, clip_shards):
    head, states = [], []
    for rank in range(2):
        loader = _loader(processor, clip_shards, packing=True, rank=rank, world_size=2)
        for batch in islice(loader, 3):
            head += batch["sample_keys"]
        states.append(json.loads(json.dumps(loader.state_dict())))
    tail = []
    for batch in islice(_loader(processor, clip_shards, states=dict(enumerate(states)), packing=True), 30):
        assert _cost(batch) <= BUDGET
        tail += batch["sample_keys"]
    epoch0 = Counter(k["key"] for k in head + tail if k["epoch"] == 0)
    assert set(epoch0.values()) == {1} and len(epoch0) == 24  # every clip and image once
