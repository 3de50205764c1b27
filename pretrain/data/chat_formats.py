"""Conversation formats (`data.chat_template`) as Jinja chat templates that transformers renders.

`auto` keeps the tokenizer's own template. The named formats are the ones LLaVA-family checkpoints were trained
with (LLaVA's `conv_mode`s); the tokenizer carries the chosen one, so training renders it, the checkpoint's
tokenizer saves it, and the export's processor applies it. Every template takes a message's content either as a
string (training: LLaVA turns with `<image>` in the text) or as typed parts (`{"type": "image"}`,
`{"type": "text", "text": ...}`: what `processor.apply_chat_template` is given), and renders an image part as
`<image>\\n`, where LLaVA puts the placeholder, so both forms give the same text.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pretrain.config import CHAT_FORMAT_CHOICES, CHAT_FORMATS, ConfigError

# One message's content as text: a string as it is, typed parts joined (an image as its placeholder line).
_CONTENT = (
    "{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
# The number of images in a message (plain keeps only the images of a user turn).
_IMAGES = (
    "{%- macro images(m) -%}{%- if m['content'] is string -%}{{ '<image>' * m['content'].count('<image>') }}"
    "{%- else -%}{%- for p in m['content'] if p['type'] == 'image' -%}<image>{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
CHATML_SYSTEM = "Answer the questions."


def _system_default(text: str) -> str:
    """`system` = the conversation's system turn, else the format's default; `turns` = the others."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]) -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}"
        f"{{%- set system = {text!r} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
    )


# LLaVA conv_vicuna_v1: "<system> USER: ... ASSISTANT: ...</s>USER: ..."
VICUNA_V1 = _CONTENT + _system_default(VICUNA_SYSTEM) + (
    "{{- system -}}"
    "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{ ' USER: ' + content(m) }}"
    "{%- else -%}{{ ' ASSISTANT: ' + content(m) + eos_token }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# LLaVA conv_llava_plain (stage-1 captions): the image(s), then the caption and a newline; user text is dropped.
PLAIN = _CONTENT + _IMAGES + (
    "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'user' -%}{{ images(m) }}"
    "{%- else -%}{{ content(m) + '\\n' }}{%- endif -%}{%- endfor -%}"
)


def _llama2(system: str, sep: str) -> str:
    """LLaVA's LLAMA_2 separator style: "[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST] ... </s>" + sep + "[INST] ..."
    (no <<SYS>> block when the system text is empty, as in conv_mistral_instruct)."""
    return _CONTENT + _system_default(system) + (
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
        "{%- if loop.first and system -%}{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content(m) -%}"
        "{%- else -%}{%- set text = content(m) -%}{%- endif -%}"
        "{{ ('' if loop.first else " + sep + ") + '[INST] ' + text + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + content(m) + ' ' + eos_token }}{%- endif -%}{%- endfor -%}"
    )


LLAMA2 = _llama2(LLAMA2_SYSTEM, "bos_token")  # rounds separated by <s>
MISTRAL = _llama2("", "''")  # conv_mistral_instruct: no separator between rounds

# LLaVA conv_chatml_direct, with the newline after each end marker that ChatML tokenizers (Qwen, Yi) use.
CHATML = _CONTENT + _system_default(CHATML_SYSTEM) + (
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}"
    "{%- for m in turns -%}{{ '<|im_start|>' + m['role'] + '\\n' + content(m) + '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# The names are the config's (validated when the config is read); the templates are here, one for each name.
FORMATS = dict(zip(CHAT_FORMATS, (VICUNA_V1, PLAIN, LLAMA2, MISTRAL, CHATML), strict=True))
CHOICES = CHAT_FORMAT_CHOICES


def template_for(name: str) -> str | None:
    """The Jinja text `data.chat_template` names; None for `auto` (the tokenizer's own)."""
    if name == "auto":
        return None
    if name in FORMATS:
        return FORMATS[name]
    path = Path(name).expanduser()
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text()
    raise ConfigError(f"data.chat_template={name!r}: not a format nor a .jinja file; valid: {', '.join(CHOICES)}")


def apply_chat_format(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """Give the tokenizer the conversation format the run trains with (it is saved with the tokenizer)."""
    template = template_for(name)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
