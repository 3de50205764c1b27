"""Text side of a sample: token ids and labels, with each `<image>` expanded to that image's token count.

The image side is given as a list of per-image token counts, in placeholder order (a fixed `image_tokens` per image
when tiling is none; the AnyRes count from each image's size otherwise); `True` / `False` mean one image of the
fixed count / none, as for single-image samples.
Captions: `[bos] <image>*n_1 ... <image>*n_k caption eos`, labels on the caption and eos only.
Conversations (LLaVA `from`/`value` or `role`/`content` turns) are rendered by the tokenizer's own chat template;
labels cover the assistant turns only. Which tokens belong to an assistant turn is found by rendering the prefixes
(`messages[:i]` with a generation prompt, and `messages[:i+1]`) and mapping those character spans through the
tokenizer's offsets: this works with any template, not only those with `{% generation %}` markers.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pretrain.config import ConfigError
from pretrain.data import errors
from pretrain.data.errors import SampleError
from pretrain.tokens import IGNORE, IMAGE_TOKEN

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = IMAGE_TOKEN


@dataclass
class TokenizedText:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class TextProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_tokens: int,
                 max_length: int, video_token_id: int | None = None) -> None:
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id  # None: the run takes no video
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; captions need one to end")

    def image_counts(self, images: bool | list[int]) -> list[int]:
        """Per-image token counts: a list as given, True = one image of the fixed count, False = none."""
        if isinstance(images, bool):
            return [self.image_tokens] if images else []
        return list(images)

    def caption(self, text: str, has_image: bool | list[int] = True, video_tokens: int = 0) -> TokenizedText:
        """`video_tokens`: a clip's token count; its tokens follow the images' in the prompt."""
        text = text.strip()
        if not text:
            raise SampleError(errors.EMPTY_TEXT)
        prompt = self.bos + [self.image_token_id] * sum(self.image_counts(has_image))
        prompt += [self.video_token_id] * video_tokens if video_tokens else []
        target = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return self._fit(prompt + target, [IGNORE] * len(prompt) + target)

    def conversation(self, turns: list[dict], has_image: bool | list[int], video_tokens: int = 0) -> TokenizedText:
        """`video_tokens`: the token count of the sample's clip, whose one `<video>` placeholder they replace
        (0: no clip)."""
        counts = self.image_counts(has_image)
        messages = to_messages(turns, len(counts))
        if self.tok.chat_template is None:
            raise ConfigError("the tokenizer has no chat template and conversations need one: set data.chat_template "
                              "to the format the decoder was trained with (vicuna_v1, plain, llama2, mistral, chatml "
                              "or a .jinja file)")
        text = self._render(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(self._render(messages[:i], generation_prompt=True))
                end = len(self._render(messages[: i + 1], generation_prompt=False))
                if not text.startswith(self._render(messages[: i + 1], generation_prompt=False)):
                    raise ValueError("the chat template does not render prefixes stably; cannot mask labels")
                spans.append((start, end))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels, placeholders, videos = [], [], 0, 0
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid == self.video_token_id:
                videos += 1
                ids += [tid] * video_tokens
                labels += [IGNORE] * video_tokens
                continue
            if tid == self.image_token_id:
                n = counts[placeholders] if placeholders < len(counts) else 0
                placeholders += 1
                ids += [tid] * n
                labels += [IGNORE] * n
                continue
            ids.append(tid)
            labels.append(tid if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE)
        if placeholders != len(counts):  # the template itself added or dropped a placeholder
            raise SampleError(errors.IMAGE_COUNT_MISMATCH, f"{placeholders} image tokens rendered for "
                                                          f"{len(counts)} image(s)")
        if videos != int(video_tokens > 0):
            raise SampleError(errors.MISSING_VIDEO, f"{videos} <video> placeholders rendered for "
                                                    f"{int(video_tokens > 0)} clip(s)")
        if self.bos and ids[:1] != self.bos:
            ids, labels = self.bos + ids, [IGNORE] + labels
        return self._fit(ids, labels)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return self.tok.apply_chat_template([], tokenize=False, add_generation_prompt=generation_prompt) \
                if generation_prompt else ""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _fit(self, ids: list[int], labels: list[int]) -> TokenizedText:
        """Too long: cut text from the end, never image tokens; a sample whose images or all labels would be cut
        is dropped."""
        if len(ids) <= self.max_length:
            return TokenizedText(ids, labels)
        visual = (self.image_token_id, self.video_token_id)
        last_image = max((i for i, t in enumerate(ids) if t in visual), default=-1)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if last_image >= self.max_length:
            raise SampleError(errors.TOO_LONG, "image tokens do not fit data.max_length")
        if all(x == IGNORE for x in labels):
            raise SampleError(errors.TOO_LONG, "no label token fits data.max_length")
        return TokenizedText(ids, labels, truncated=True)


def to_messages(turns: list[dict], n_images: int | bool) -> list[dict]:
    """LLaVA turns -> chat messages. A single image without a placeholder gets one at the start of the first user
    turn, as LLaVA does; otherwise placeholders and images must be as many (else `image_count_mismatch`)."""
    n_images = int(n_images)
    if not isinstance(turns, list) or not turns:
        raise SampleError(errors.BAD_CONVERSATION, "no turns")
    messages = []
    for t in turns:
        if not isinstance(t, dict):
            raise SampleError(errors.BAD_CONVERSATION, "a turn is not an object")
        role = ROLE_NAMES.get(str(t.get("from", t.get("role", ""))).lower())
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            raise SampleError(errors.BAD_CONVERSATION, f"turn {t!r:.80}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SampleError(errors.EMPTY_TEXT, "no assistant turn")
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_images == 1 and n_placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError(errors.BAD_CONVERSATION, "an image but no user turn")
        first_user["content"] = IMAGE_PLACEHOLDER + "\n" + first_user["content"]
    elif n_placeholders != n_images:
        raise SampleError(errors.IMAGE_COUNT_MISMATCH, f"{n_placeholders} <image> placeholders for "
                                                       f"{n_images} image(s)")
    return messages
