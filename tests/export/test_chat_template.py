"""The exported processor's chat template: transformers' typed messages render to the text training renders for
the same conversation, for every `data.chat_template` choice, and tokenize (images expanded) to the loader's ids;
`apply_chat_template(..., tokenize=True, return_dict=True)` and `pipeline("image-text-to-text")` work on a tiny
local export."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, pipeline

from pretrain.config import ModelConfig
from pretrain.data.chat_formats import FORMATS, apply_chat_format
from pretrain.data.text import TextProcessor
from pretrain.export.chat_template import export_chat_template, is_export_template
from pretrain.export.hf import processor_from
from pretrain.model.build import build_llava_config

JINJA = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}" \
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
CHOICES = ["auto", *sorted(FORMATS), "file.jinja"]
TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
         {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "Grey."}]


def typed(image: Image.Image | None = None) -> list[dict]:
    """TURNS as transformers' typed messages (the image item carries the picture when given)."""
    item = {"type": "image", **({"image": image} if image is not None else {})}
    return [{"role": "user", "content": [item, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Its colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Grey."}]}]


def strings(turns: list[dict]) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


@pytest.fixture(scope="module")
def llava_config(assets, tokenizer):
    return build_llava_config(ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"])), tokenizer)


def _tokenizer(tokenizer, choice: str, tmp_path):
    if choice == "file.jinja":
        (tmp_path / choice).write_text(JINJA)
        choice = str(tmp_path / choice)
    return apply_chat_format(copy.deepcopy(tokenizer), choice)


def _export_processor(tok, assets, config, out):
    """What `pretrain convert` writes for the processor: the checkpoint's hf_meta -> processor_from -> disk."""
    meta = out.parent / (out.name + "_meta")
    tok.save_pretrained(meta)
    AutoImageProcessor.from_pretrained(assets["clip"]).save_pretrained(meta)
    processor_from(meta, config).save_pretrained(out)
    return AutoProcessor.from_pretrained(out)


def _picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("choice", CHOICES)
def test_typed_messages_render_and_tokenize_as_training(tokenizer, assets, llava_config, tmp_path, choice):
    tok = _tokenizer(tokenizer, choice, tmp_path)
    processor = _export_processor(tok, assets, llava_config, tmp_path / "hf")
    assert is_export_template(processor.chat_template)
    # A run that starts from an export trains with its wrapped template: exporting that run wraps it once.
    assert export_chat_template(processor.chat_template) == processor.chat_template
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == processor.chat_template  # generate --video
    bos = tok.bos_token
    # Text: what training tokenizes is bos + the training template's rendering of the string turns.
    for messages, gen in ((typed(), False), (typed()[:1], True), (typed()[:3], True)):
        want = tok.apply_chat_template(strings(TURNS[: len(messages)]), tokenize=False, add_generation_prompt=gen)
        want = want if want.startswith(bos) else bos + want
        assert processor.apply_chat_template(messages, add_generation_prompt=gen) == want
        assert "[{" not in want and want.count("<image>") == 1
    # Plain string contents keep working and give the same text.
    assert processor.apply_chat_template(strings(TURNS)) == processor.apply_chat_template(typed())
    # Tokens: the processor expands the image to the same ids (and labels' positions) as our loader.
    out = processor.apply_chat_template(typed(_picture(0)), tokenize=True, return_dict=True, return_tensors="pt")
    image_tokens = int((out["input_ids"] == llava_config.image_token_id).sum())
    assert image_tokens == llava_config.image_seq_length > 1
    loader = TextProcessor(tok, llava_config.image_token_id, llava_config.image_seq_length, max_length=512)
    assert out["input_ids"][0].tolist() == loader.conversation(TURNS, has_image=True).input_ids
    assert out["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("choice", ["auto", "vicuna_v1", "plain"])
def test_several_images_and_roles_each_get_one_placeholder_the_processor_expands(tokenizer, assets, llava_config,
                                                                                tmp_path, choice):
    tok = _tokenizer(tokenizer, choice, tmp_path)
    processor = _export_processor(tok, assets, llava_config, tmp_path / "hf")
    a, b, c = (_picture(i) for i in range(3))
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                             {"type": "text", "text": "Compare "}, {"type": "text", "text": "them."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
                {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "image": c}]}]
    as_strings = [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "<image>\n<image>\nCompare them."},
                  {"role": "assistant", "content": "Same."}, {"role": "user", "content": "And<image>\n"}]
    want = tok.apply_chat_template(as_strings, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == tok.bos_token + want
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert want.count("<image>") == 3  # one placeholder per image item, whatever the format
    assert int((out["input_ids"] == llava_config.image_token_id).sum()) == 3 * llava_config.image_seq_length
    assert out["pixel_values"].shape[0] == 3


def test_pipeline_runs_on_a_tiny_local_export(tokenizer, assets, llava_config, tmp_path):
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    LlavaForConditionalGeneration(llava_config).save_pretrained(hf)
    _export_processor(_tokenizer(tokenizer, "auto", tmp_path), assets, llava_config, hf)
    pipe = pipeline("image-text-to-text", model=str(hf), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": _picture(0)},
                                             {"type": "image", "image": _picture(1)},
                                             {"type": "text", "text": "What is it?"}]}]
    out = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False})
    reply = out[0]["generated_text"]
    assert reply[-1]["role"] == "assistant" and isinstance(reply[-1]["content"], str)


def test_generate_picks_the_device_and_dtype_and_runs_in_bf16(tokenizer, assets, llava_config, tmp_path):
    from pretrain.export.inference import Captioner, resolve_device

    cpu = torch.device("cpu")
    assert resolve_device("cpu", "auto") == (cpu, torch.float32)  # this machine has no GPU: fp32 on the CPU
    assert resolve_device("cpu", "bf16") == (cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="fp16"):
        resolve_device("cpu", "fp16")
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    LlavaForConditionalGeneration(llava_config).save_pretrained(hf)
    _export_processor(_tokenizer(tokenizer, "auto", tmp_path), assets, llava_config, hf)
    captioner = Captioner(hf, dtype=torch.bfloat16, device=cpu)
    inputs = captioner.inputs([_picture(0), _picture(1)], "Compare <image> and <image>")
    assert captioner.model.dtype == inputs["pixel_values"].dtype == torch.bfloat16
    assert int((inputs["input_ids"] == llava_config.image_token_id).sum()) == 2 * llava_config.image_seq_length
    assert isinstance(captioner.together([_picture(0), _picture(1)], "Compare <image> and <image>", 2), str)
