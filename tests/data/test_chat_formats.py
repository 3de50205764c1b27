"""`data.chat_template`: LLaVA's conversation formats render as LLaVA writes them, labels stay on the assistant
turns, typed content (what inference gives a processor) renders like training's text, and the exported processor
carries the format."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoImageProcessor, AutoProcessor, LlavaConfig

from pretrain.config import ConfigError
from pretrain.data.chat_formats import CHATML_SYSTEM, LLAMA2_SYSTEM, VICUNA_SYSTEM, apply_chat_format
from pretrain.data.text import TextProcessor
from pretrain.tokens import IGNORE

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
         {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "Grey."}]
MESSAGES = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Its colour?"}, {"role": "assistant", "content": "Grey."}]
TYPED = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
         {"role": "user", "content": [{"type": "text", "text": "Its colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Grey."}]}]
# LLaVA's own renderings (llava/conversation.py get_prompt) of MESSAGES.
EXPECTED = {
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s> USER: Its colour? "
                 "ASSISTANT: Grey.</s>",
    "llama2": f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s><s>[INST] "
              "Its colour? [/INST] Grey. </s>",
    "mistral": "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] Its colour? [/INST] Grey. </s>",
    "chatml": f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
              "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nIts colour?<|im_end|>\n"
              "<|im_start|>assistant\nGrey.<|im_end|>\n",
    "plain": "<image>A cat.\nGrey.\n",
}
ANSWER_ENDS = {"vicuna_v1": (" A cat.</s>", " Grey.</s>"), "llama2": (" A cat. </s>", " Grey. </s>"),
               "mistral": (" A cat. </s>", " Grey. </s>"), "chatml": ("A cat.<|im_end|>\n", "Grey.<|im_end|>\n")}


def _formatted(tokenizer, name):
    return apply_chat_format(copy.deepcopy(tokenizer), name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_formats_render_as_llava_and_typed_content_renders_the_same(tokenizer, name):
    tok = _formatted(tokenizer, name)
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED[name]
    assert tok.apply_chat_template(TYPED, tokenize=False) == EXPECTED[name]
    prompt = tok.apply_chat_template(TYPED[:1], tokenize=False, add_generation_prompt=True)
    assert EXPECTED[name].startswith(prompt) and "A cat" not in prompt


@pytest.mark.parametrize("name", sorted(ANSWER_ENDS))
def test_labels_cover_the_assistant_turns_and_their_end_marker_only(tokenizer, name):
    tok = _formatted(tokenizer, name)
    image = tok.convert_tokens_to_ids("<image>")
    out = TextProcessor(tok, image, image_tokens=3, max_length=256).conversation(TURNS, has_image=True)
    spans, current = [], []
    for tid, label in zip(out.input_ids, out.labels):
        if label != IGNORE:
            current.append(tid)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert tuple(spans) == ANSWER_ENDS[name]
    assert out.input_ids.count(image) == 3


def test_plain_keeps_the_image_and_the_caption(tokenizer):
    tok = _formatted(tokenizer, "plain")
    image = tok.convert_tokens_to_ids("<image>")
    turns = [{"from": "human", "value": "<image>\nRender a clear and concise summary."},
             {"from": "gpt", "value": "a grey cat"}]
    out = TextProcessor(tok, image, image_tokens=3, max_length=256).conversation(turns, has_image=True)
    assert tok.decode(out.input_ids) == "<s><image><image><image>a grey cat\n"
    assert tok.decode([t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE]) == "a grey cat\n"


def test_a_jinja_file_and_the_errors_name_the_key(tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tok = _formatted(tokenizer, str(path))
    assert tok.apply_chat_template(MESSAGES[:2], tokenize=False) == "user: <image>\nWhat is it?\nassistant: A cat.\n"
    with pytest.raises(ConfigError, match="data.chat_template"):
        _formatted(tokenizer, str(tmp_path / "missing.jinja"))
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    processor = TextProcessor(bare, bare.convert_tokens_to_ids("<image>"), image_tokens=3, max_length=256)
    with pytest.raises(ConfigError, match="set data.chat_template"):
        processor.conversation(TURNS, has_image=True)
    assert _formatted(bare, "auto").chat_template is None  # auto keeps what the tokenizer has


def test_config_key_validates_the_format(tmp_path):
    from pretrain.config import build_config

    base = {"model": {"llm": "x", "vision": "y"}, "data": {"train": [{"urls": "a.tar"}]}, "train": {"max_steps": 1}}
    assert build_config({**base, "data": {**base["data"], "chat_template": "vicuna_v1"}}).data.chat_template
    with pytest.raises(ConfigError, match="data.chat_template.*valid: auto, vicuna_v1"):
        build_config({**base, "data": {**base["data"], "chat_template": "vicuna"}})


def test_the_export_processor_renders_what_training_rendered(tokenizer, assets, tmp_path):
    """The tokenizer saved in a checkpoint's hf_meta carries the format; the export's processor applies it."""
    from pretrain.export.hf import processor_from
    from pretrain.model.build import IMAGE_TOKEN

    meta = tmp_path / "hf_meta"
    tok = _formatted(tokenizer, "vicuna_v1")
    tok.save_pretrained(meta)
    AutoImageProcessor.from_pretrained(assets["clip"]).save_pretrained(meta)
    from transformers import AutoConfig
    config = LlavaConfig(vision_config=AutoConfig.from_pretrained(assets["clip"]),
                         text_config=AutoConfig.from_pretrained(assets["llama"]),
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    processor_from(meta, config).save_pretrained(tmp_path / "hf")
    exported = AutoProcessor.from_pretrained(tmp_path / "hf")
    rendered = exported.apply_chat_template(TYPED[:1], add_generation_prompt=True, tokenize=False)
    # bos first, as training tokenizes it (TextProcessor adds it where the template does not).
    assert rendered == "<s>" + tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
