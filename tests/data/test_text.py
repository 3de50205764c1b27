"""Token ids and labels: captions, chat-template conversations (labels on assistant turns only), image tokens,
and what happens to samples that are too long."""

from __future__ import annotations

import pytest

from pretrain.data.errors import SampleError
from pretrain.data.text import TextProcessor
from pretrain.tokens import IGNORE


@pytest.fixture()
def text(tokenizer):
    return TextProcessor(tokenizer, tokenizer.convert_tokens_to_ids("<image>"), image_tokens=5, max_length=64)


def _decode_labels(tok, out):
    return tok.decode([t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE])


def test_caption_labels_cover_caption_and_eos_only(text, tokenizer):
    out = text.caption("two red circles on the left.")
    img = tokenizer.convert_tokens_to_ids("<image>")
    assert out.input_ids[:1] == [tokenizer.bos_token_id]
    assert out.input_ids[1:6] == [img] * 5
    assert all(lab == IGNORE for lab in out.labels[:6])
    assert out.input_ids[-1] == out.labels[-1] == tokenizer.eos_token_id
    assert _decode_labels(tokenizer, out) == "two red circles on the left.</s>"


def test_conversation_masks_everything_but_assistant_turns(text, tokenizer):
    turns = [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "how many shapes are there?"}, {"from": "gpt", "value": "two"}]
    out = text.conversation(turns, has_image=True)
    img = tokenizer.convert_tokens_to_ids("<image>")
    assert out.input_ids.count(img) == 5
    labelled = _decode_labels(tokenizer, out)
    assert "red" in labelled and "two" in labelled
    assert "what color" not in labelled and "user" not in labelled and "how many" not in labelled
    # The end-of-turn marker is part of the assistant turn (so the model learns to stop).
    assert labelled.count("<|im_end|>") == 2


def test_image_without_placeholder_gets_one_and_placeholder_without_image_is_bad(text, tokenizer):
    out = text.conversation([{"role": "user", "content": "describe"}, {"role": "assistant", "content": "x"}],
                            has_image=True)
    assert out.input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 5
    with pytest.raises(SampleError) as e:
        text.conversation([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}], has_image=False)
    assert e.value.reason == "image_count_mismatch"


def test_text_only_conversation_has_no_image_tokens(text, tokenizer):
    out = text.conversation([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], has_image=False)
    assert tokenizer.convert_tokens_to_ids("<image>") not in out.input_ids
    assert "hello" in _decode_labels(tokenizer, out)


@pytest.mark.parametrize("turns, reason", [
    ([], "bad_conversation"),
    ([{"from": "human", "value": "hi"}], "empty_text"),
    ([{"from": "alien", "value": "hi"}, {"from": "gpt", "value": "x"}], "bad_conversation"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "bad_conversation"),
])
def test_bad_conversations_are_counted_reasons(text, turns, reason):
    with pytest.raises(SampleError) as e:
        text.conversation(turns, has_image=False)
    assert e.value.reason == reason


def test_too_long_truncates_text_never_image_tokens(tokenizer):
    img = tokenizer.convert_tokens_to_ids("<image>")
    text = TextProcessor(tokenizer, img, image_tokens=10, max_length=16)
    out = text.caption("three yellow triangles at the bottom. " * 5)
    assert out.truncated and len(out.input_ids) == 16
    assert out.input_ids.count(img) == 10 and out.labels[-1] != IGNORE
    with pytest.raises(SampleError) as e:
        TextProcessor(tokenizer, img, image_tokens=20, max_length=16).caption("one red circle.")
    assert e.value.reason == "too_long"


def test_empty_caption_is_skipped(text):
    with pytest.raises(SampleError) as e:
        text.caption("   ")
    assert e.value.reason == "empty_text"
