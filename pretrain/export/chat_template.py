"""The export's chat template: transformers' typed messages rendered to the text training rendered.

Inference drives a VLM with typed content (`{"role": "user", "content": [{"type": "image"}, {"type": "text",
"text": "..."}]}`: `processor.apply_chat_template`, `pipeline("image-text-to-text")`), while training renders
LLaVA turns whose content is a string with `<image>` where the picture goes, through whichever template the run
used (`data.chat_template`: the tokenizer's own, a named format, a .jinja file). The exported template wraps that
training template unchanged: a prologue turns each typed content into the string training would have given
(an image item as `<image>\\n`, LLaVA's placeholder line, a video item as `<video>\\n`, LLaVA-Video's, text items as
they are, in order) and the training template renders the result. One placeholder per image or video item: the
processor expands each to that image's or clip's token count.

Training always starts a sequence with bos (pretrain.data.text.TextProcessor adds it when the template does not),
so the wrapper does the same: the rendered text is exactly what training tokenized, and the processor's tokenizing
path then adds no second bos.
"""

from __future__ import annotations

from pretrain.data.text import IMAGE_PLACEHOLDER
from pretrain.tokens import VIDEO_TOKEN

MARKER = "{#- pretrain: typed content rendered as training's text -#}"

# Typed content -> the string training renders; string contents pass through unchanged.
_PROLOGUE = (
    "{%- set typed = namespace(messages=[], text='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is not defined or m['content'] is none or m['content'] is string -%}"
    "{%- set typed.messages = typed.messages + [m] -%}"
    "{%- else -%}{%- set typed.text = '' -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set typed.text = typed.text + " + repr(IMAGE_PLACEHOLDER + "\n") + " -%}"
    "{%- elif part['type'] == 'video' -%}{%- set typed.text = typed.text + " + repr(VIDEO_TOKEN + "\n") + " -%}"
    "{%- elif part['type'] == 'text' -%}{%- set typed.text = typed.text + part['text'] -%}"
    "{%- else -%}{{ raise_exception('content type ' + part['type'] + ' is not supported: images, video and text "
    "only') }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set typed.messages = typed.messages + [dict(m, content=typed.text)] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = typed.messages -%}"
)
# bos first, as training puts it, unless the training template already wrote it.
_BODY_START = "{%- set rendered -%}"
_BODY_END = (
    "{%- endset -%}"
    "{%- if bos_token is defined and bos_token and not rendered.startswith(bos_token) -%}{{- bos_token -}}"
    "{%- endif -%}{{- rendered -}}"
)


def is_export_template(template: str | None) -> bool:
    return template is not None and template.startswith(MARKER)


def export_chat_template(training_template: str | dict[str, str] | None) -> str | dict[str, str] | None:
    """The processor's template for a model trained with `training_template` (idempotent; a tokenizer's named
    templates each wrapped; None stays None: no template, nothing to render)."""
    if isinstance(training_template, dict):
        return {name: export_chat_template(t) for name, t in training_template.items()}
    if training_template is None or is_export_template(training_template):
        return training_template
    return MARKER + _PROLOGUE + _BODY_START + training_template + _BODY_END
