"""Samples with several images (`KEY.0.jpg`, `KEY.1.png`, ... in placeholder order), one tile per image: decoded in
order, each placeholder expanded, bad counts skipped with their own reasons, collated flat, and the training forward
running the tower once on all of a micro-batch's images with each image's features at its own placeholder."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers.shards import image_bytes
from PIL import Image
from transformers import CLIPImageProcessorPil

from pretrain.config import ModelConfig
from pretrain.data.batching import collate
from pretrain.data.errors import SampleError
from pretrain.data.image import ImageTransform
from pretrain.data.sample import SampleProcessor
from pretrain.data.text import TextProcessor
from pretrain.model.build import build_model
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES
from pretrain.model.vlm import VLMForTraining

TOKENS = 5  # image tokens per image in the data-only tests


def _transform(size: int = 16) -> ImageTransform:
    return ImageTransform.from_processor(CLIPImageProcessorPil(size={"shortest_edge": size},
                                                               crop_size={"height": size, "width": size}))


def _processor(tokenizer, image_tokens: int = TOKENS, size: int = 16, **kw) -> SampleProcessor:
    text = TextProcessor(tokenizer, tokenizer.convert_tokens_to_ids("<image>"), image_tokens, max_length=512)
    return SampleProcessor(text, _transform(size), 10**8, **kw)


def _conversation(question: str, answer: str = "a red square and a blue circle.", **meta) -> bytes:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return json.dumps({"conversations": turns, **meta}).encode()


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token`."""
    runs, at = [], 0
    while at < len(ids):
        if ids[at] == token:
            end = at
            while end < len(ids) and ids[end] == token:
                end += 1
            runs.append((at, end - at))
            at = end
        else:
            at += 1
    return runs


A, B = image_bytes("JPEG", (40, 30), seed=1), image_bytes("PNG", (20, 50), seed=2)


def test_images_are_decoded_in_placeholder_order_and_each_placeholder_expanded(tokenizer):
    proc = _processor(tokenizer)
    parts = {"1.png": B, "0.jpg": A, "json": _conversation("<image> first, then <image> second: what are they?")}
    s = proc(parts)
    transform = _transform()
    assert s.pixel_values.shape == (2, 3, 16, 16) and s.image_tiles == [1, 1]
    assert torch.equal(s.pixel_values[0], transform(Image.open(io.BytesIO(A))))
    assert torch.equal(s.pixel_values[1], transform(Image.open(io.BytesIO(B))))
    assert s.image_sizes == [(30, 40), (50, 20)]  # (height, width) of each original
    img = tokenizer.convert_tokens_to_ids("<image>")
    runs = _runs(s.input_ids, img)
    assert [n for _, n in runs] == [TOKENS, TOKENS]  # two separate placeholders, text between them
    between = tokenizer.decode(s.input_ids[runs[0][0] + TOKENS : runs[1][0]])
    assert "first, then" in between
    # One image in its single-image layout still works; a caption puts both images' tokens first.
    one = proc({"jpg": A, "json": _conversation("<image> what is it?")})
    assert one.pixel_values.shape == (1, 3, 16, 16) and one.input_ids.count(img) == TOKENS
    caption = proc({"0.jpg": A, "1.png": B, "txt": b"two pictures."})
    assert caption.input_ids[1 : 1 + 2 * TOKENS] == [img] * (2 * TOKENS)


def test_text_only_samples_keep_working(tokenizer):
    s = _processor(tokenizer)({"json": _conversation("hello there")})
    assert s.pixel_values is None and s.image_tiles == [] and s.n_images == 0


@pytest.mark.parametrize("parts, reason", [
    ({"0.jpg": A, "1.png": B, "json": _conversation("<image> only one placeholder")}, "image_count_mismatch"),
    ({"0.jpg": A, "json": _conversation("<image> and <image>")}, "image_count_mismatch"),
    ({"0.jpg": A, "2.png": B, "json": _conversation("<image> <image> <image>")}, "missing_image"),
    ({"0.jpg": A, "json": _conversation("<image> <image>", image=["a.jpg", "b.png"])}, "missing_image"),
    ({"jpg": A, "1.png": B, "json": _conversation("<image> <image>")}, "image_count_mismatch"),
    ({"0.jpg": A, "1.svg": b"<svg/>", "json": _conversation("<image> <image>")}, "unsupported_image_format"),
])
def test_bad_image_counts_are_skipped_with_their_own_reason(tokenizer, parts, reason):
    with pytest.raises(SampleError) as e:
        _processor(tokenizer)(parts)
    assert e.value.reason == reason


def test_more_tiles_than_the_cap_are_skipped(tokenizer):
    parts = {"0.jpg": A, "1.png": B, "2.jpg": A, "json": _conversation("<image> <image> <image>")}
    assert _processor(tokenizer, max_image_tiles=3)(parts).pixel_values.shape[0] == 3
    with pytest.raises(SampleError) as e:
        _processor(tokenizer, max_image_tiles=2)(parts)
    assert e.value.reason == "too_many_image_tiles"


def test_collate_concatenates_tiles_and_pairs_only_single_image_samples(tokenizer):
    proc = _processor(tokenizer)
    two = proc({"0.jpg": A, "1.png": B, "json": _conversation("<image> <image> compare")})
    text_only = proc({"json": _conversation("hello")})
    one = proc({"png": B, "txt": b"a picture."})
    batch = collate([[two], [text_only], [one]], tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert torch.equal(batch["pixel_values"][:2], two.pixel_values)
    assert torch.equal(batch["pixel_values"][2], one.pixel_values[0])
    assert batch["image_tiles"] == [1, 1, 1] and batch["image_sizes"] == [(30, 40), (50, 20), (50, 20)]
    # Alignment pairs: the single-image sample only, pointing at its own image (the third).
    assert batch["image_pair_index"] == [2] and len(batch["image_texts"]) == 1
    assert tokenizer.decode(batch["image_texts"][0]).startswith("a picture.")
    assert collate([[text_only]], tokenizer.pad_token_id)["pixel_values"] is None


def test_forward_runs_the_tower_once_and_puts_each_image_at_its_placeholder(tokenizer):
    mcfg = ModelConfig(llm=dict(DECODER_SHAPES["llama"]), vision=dict(VISION_SHAPES["clip"]))
    model = build_model(mcfg, tokenizer).eval()
    wrapper = VLMForTraining(model)
    cfg = model.config
    proc = _processor(tokenizer, cfg.image_seq_length, cfg.vision_config.image_size)
    two = proc({"0.jpg": A, "1.png": B, "json": _conversation("<image> then <image>: what changed?")})
    one = proc({"jpg": B, "txt": b"a picture."})
    batch = collate([[two], [one]], tokenizer.pad_token_id)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        embeds = wrapper.embed(batch["input_ids"], batch["pixel_values"])
        loss, n = wrapper(batch)
    hook.remove()
    assert len(calls) == 2 and torch.isfinite(loss) and int(n) > 0  # one tower call per embed, 3 images each
    with torch.no_grad():
        feats = wrapper.image_features(batch["pixel_values"])
    starts = [at for at, _ in _runs(batch["input_ids"][0].tolist(), cfg.image_token_id)]
    k = cfg.image_seq_length
    assert len(starts) == 2
    for image, at in enumerate(starts):
        torch.testing.assert_close(embeds[0, at : at + k], feats[image], rtol=0, atol=0)
    at = _runs(batch["input_ids"][1].tolist(), cfg.image_token_id)[0][0]
    torch.testing.assert_close(embeds[1, at : at + k], feats[2], rtol=0, atol=0)
    # The two images differ, so a swapped order would be seen.
    assert not torch.allclose(feats[0], feats[1])
