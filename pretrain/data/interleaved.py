"""Interleaved documents (OBELICS / MMC4 style): text segments and images in document order -> token ids and labels.

A shard sample of this kind is `KEY.json` = `{"texts": [...], "images": [...], ...}`, two aligned lists with null
in one where the other holds the item (as OBELICS stores them; the image entries are the source file names), plus
the images as `KEY.0.jpg`, `KEY.1.png`, ... in document order.

Tokens: `[bos] seg seg ... eos`, where a text segment is its tokens (two text segments in a row are joined by a blank
line) and an image is its image-token count of image tokens. Labels: every text token and eos; image tokens and bos
never. Too long for `max_length`: the document is cut there; an image that would not fit whole is dropped with every
item after it (an image is never cut), the sample counts as truncated, and one with no label token left is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pretrain.data import errors
from pretrain.data.errors import SampleError
from pretrain.data.text import TokenizedText
from pretrain.tokens import IGNORE

PARAGRAPH = "\n\n"  # between two text segments that follow each other


def is_interleaved(meta: dict) -> bool:
    return "texts" in meta and "caption" not in meta and "conversations" not in meta


def document_items(meta: dict) -> list[str | None]:
    """The document in order: a text segment (str) or None for the next image. SampleError on a malformed one."""
    texts, images = meta.get("texts"), meta.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SampleError(errors.BAD_JSON, "an interleaved document needs aligned 'texts' and 'images' lists")
    items: list[str | None] = []
    for text, image in zip(texts, images):
        if (text is None) == (image is None) or not (image is not None or isinstance(text, str)):
            raise SampleError(errors.BAD_JSON, "each item is a text or an image, the other list holding null")
        items.append(None if image is not None else text)
    return items


def tokenize_document(tok: PreTrainedTokenizerBase, items: list[str | None], image_token_id: int,
                      image_token_counts: list[int], max_length: int) -> tuple[TokenizedText, int]:
    """(tokens, how many images were kept): the images after a cut are dropped, never a part of one."""
    if len(image_token_counts) != sum(item is None for item in items):
        raise ValueError(f"{len(image_token_counts)} image-token counts for "
                         f"{sum(item is None for item in items)} images")
    ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    kept, after_text, cut, text_tokens = 0, False, False, 0
    for item in items:
        if item is None:
            n = image_token_counts[kept]
            if len(ids) + n > max_length:
                cut = True
                break
            ids += [image_token_id] * n
            labels += [IGNORE] * n
            kept, after_text = kept + 1, False
            continue
        if not item.strip():
            continue
        text = (PARAGRAPH if after_text else "") + item
        # split_special_tokens: a literal "<image>" in the text stays text, never an image position.
        tokens = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if image_token_id in tokens:
            raise SampleError(errors.BAD_CONVERSATION, "the image token inside a text segment")
        room = max_length - len(ids)
        ids += tokens[:room]
        labels += tokens[:room]
        text_tokens += len(tokens[:room])
        after_text = True
        if len(tokens) > room:
            cut = True
            break
    if not cut and len(ids) < max_length:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    elif not cut:
        cut = True
    if not text_tokens:  # eos alone teaches nothing
        raise SampleError(errors.TOO_LONG if cut else errors.EMPTY_TEXT, "no text token in the document")
    return TokenizedText(ids, labels, truncated=cut), kept


@dataclass
class Document:
    """A processed document: its tokens and its kept images' pixels, (tiles, 3, H, W) (one tile per image without
    tiling), with each image's tile count and original (height, width)."""

    tokens: TokenizedText
    pixels: torch.Tensor | None
    image_tiles: list[int]
    image_sizes: list[tuple[int, int]]


def process_document(processor: Any, meta: dict, images: list[bytes]) -> Document:
    """A document through the SampleProcessor's image path (`decode_images`: the transform, the per-image token
    counts and the tile cap); `images` are its stored images in document order."""
    items = document_items(meta)
    if len(images) != items.count(None):
        raise SampleError(errors.MISSING_IMAGE, f"{len(images)} images stored for {items.count(None)} in the text")
    # All decoded, the dropped ones too: a corrupt image is a bad sample wherever it sits.
    pixels, sizes, counts = processor.decode_images(images)
    text = processor.text
    tokens, kept = tokenize_document(text.tok, items, text.image_token_id, counts, text.max_length)
    stacked = torch.cat(pixels[:kept]) if kept else None
    return Document(tokens, stacked, [p.shape[0] for p in pixels[:kept]], sizes[:kept])
