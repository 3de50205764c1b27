"""Interleaved documents at run time: labels exactly the text tokens (and eos), images in document order, an image
never cut by data.max_length, bad documents skipped with their reason."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.shards import image_bytes
from transformers import AutoImageProcessor

from pretrain.data.errors import SampleError
from pretrain.data.image import ImageTransform, decode_image
from pretrain.data.interleaved import PARAGRAPH, tokenize_document
from pretrain.data.sample import SampleProcessor
from pretrain.data.text import TextProcessor
from pretrain.tokens import IGNORE

ITEMS = ["A red circle.", None, "Two blue squares.", "On the left.", None, "The end."]


@pytest.fixture(scope="module")
def image_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_are_exactly_the_text_tokens(tokenizer, image_id):
    tokens, kept = tokenize_document(tokenizer, ITEMS, image_id, [3, 5], max_length=1000)
    texts = [_encode(tokenizer, t) for t in ("A red circle.", "Two blue squares.", PARAGRAPH + "On the left.",
                                              "The end.")]
    expected = ([tokenizer.bos_token_id] + texts[0] + [image_id] * 3 + texts[1] + texts[2] + [image_id] * 5
                + texts[3] + [tokenizer.eos_token_id])
    assert kept == 2 and not tokens.truncated
    assert tokens.input_ids == expected
    assert [t for t in tokens.labels if t != IGNORE] == sum(texts, []) + [tokenizer.eos_token_id]
    for tid, label in zip(tokens.input_ids, tokens.labels, strict=True):
        assert label == (IGNORE if tid in (image_id, tokenizer.bos_token_id) else tid)


def _image_blocks(ids: list[int], image_id: int) -> list[int]:
    """Lengths of the runs of image tokens."""
    runs, n = [], 0
    for t in [*ids, None]:
        if t == image_id:
            n += 1
        elif n:
            runs, n = [*runs, n], 0
    return runs


def test_an_image_is_never_cut(tokenizer, image_id):
    full, _ = tokenize_document(tokenizer, ITEMS, image_id, [3, 5], max_length=1000)
    dropped_whole = 0
    for max_length in range(2, len(full.input_ids) + 1):
        try:
            tokens, kept = tokenize_document(tokenizer, ITEMS, image_id, [3, 5], max_length)
        except SampleError as err:
            assert err.reason == "too_long" and max_length < 4  # nothing but bos fits
            continue
        assert len(tokens.input_ids) <= max_length
        assert _image_blocks(tokens.input_ids, image_id) == [3, 5][:kept]  # whole images only
        assert tokens.input_ids == full.input_ids[: len(tokens.input_ids)]  # a prefix of the document
        assert tokens.truncated == (max_length < len(full.input_ids))
        # The image that did not fit is gone, though some of its tokens would have: dropped, not cut.
        dropped_whole += int(kept < 2 and len(tokens.input_ids) < max_length)
    assert dropped_whole >= 4  # the case occurred (for the first image and the second)


def test_bad_documents(tokenizer, image_id):
    literal, _ = tokenize_document(tokenizer, ["the token <image> is text here"], image_id, [], 100)
    assert image_id not in literal.input_ids
    with pytest.raises(SampleError, match="too_long"):
        tokenize_document(tokenizer, [None, "words"], image_id, [10], max_length=8)
    with pytest.raises(SampleError, match="empty_text"):
        tokenize_document(tokenizer, [None, " "], image_id, [2], max_length=100)
    with pytest.raises(ValueError, match="image-token counts"):
        tokenize_document(tokenizer, ITEMS, image_id, [3], max_length=100)


@pytest.fixture(scope="module")
def processor(tokenizer, assets, image_id):
    text = TextProcessor(tokenizer, image_id, image_tokens=16, max_length=64)
    image = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(assets["clip"]))
    return SampleProcessor(text, image, max_image_pixels=10**7)


def _doc(texts: list, images: list) -> bytes:
    return json.dumps({"texts": texts, "images": images, "source": "interleaved"}).encode()


def test_sample_processor_reads_documents(processor, tokenizer, image_id):
    png, jpg = image_bytes("PNG", seed=1), image_bytes("JPEG", size=(50, 20), seed=2)
    two = {"json": _doc(["Look.", None, "Then.", None], [None, "a.png", None, "b.jpg"]), "0.png": png, "1.jpg": jpg}
    sample = processor(two)
    assert sample.pixel_values.shape[:2] == (2, 3) and sample.input_ids.count(image_id) == 32
    for i, data in enumerate([png, jpg]):  # in document order
        assert torch.equal(sample.pixel_values[i], processor.image_transform(decode_image(data, max_pixels=10**7)))
    # The second image would pass max_length=64: it is dropped with what follows, the first stays whole.
    long_text = " ".join(["word"] * 5)  # about 24 tokens: the second text is cut before the second image
    cut = processor({**two, "json": _doc([long_text, None, long_text, None], [None, "a.png", None, "b.jpg"])})
    assert cut.truncated and cut.pixel_values.shape[0] == 1 and cut.input_ids.count(image_id) == 16
    # Per-image token counts from the processor where it has them (AnyRes: from each image's size).
    varied = copy.copy(processor)
    varied.image_token_count = lambda height, width: width // 10
    sample = varied(two)
    assert _image_blocks(sample.input_ids, image_id) == [4, 5]  # 40 and 50 pixels wide, in document order
    text_only = processor({"json": _doc(["Just text."], [None])})
    assert text_only.pixel_values is None and image_id not in text_only.input_ids
    for parts, reason in [
        ({"json": two["json"], "0.png": png}, "missing_image"),  # one of two images not stored
        ({**two, "1.jpg": b"not an image"}, "corrupt_image"),
        ({"json": _doc(["a", "b"], [None]), "0.png": png}, "bad_json"),
    ]:
        with pytest.raises(SampleError) as err:
            processor(parts)
        assert err.value.reason == reason
