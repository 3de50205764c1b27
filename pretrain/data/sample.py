"""One raw WebDataset sample -> model inputs: decoded, preprocessed image + token ids and labels.

A sample is `KEY.<image ext>` + `KEY.json` (`caption` or `conversations`) and/or `KEY.txt` (a caption). Anything
unusable raises SampleError with its reason; the loader skips and counts it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from pretrain.data import errors
from pretrain.data.errors import SampleError
from pretrain.data.image import decode_image
from pretrain.data.image_formats import IMAGE_EXTENSIONS, REFUSED_EXTENSIONS
from pretrain.data.interleaved import is_interleaved, process_document
from pretrain.data.text import TextProcessor


@dataclass
class ProcessedSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError(errors.BAD_UTF8, str(err)) from None


def read_metadata(parts: dict[str, bytes]) -> dict:
    if "json" in parts:
        try:
            meta = json.loads(_utf8(parts["json"]))
        except json.JSONDecodeError as err:
            raise SampleError(errors.BAD_JSON, str(err)) from None
        if not isinstance(meta, dict):
            raise SampleError(errors.BAD_JSON, "not an object")
        if "caption" in meta or "conversations" in meta or "texts" in meta:  # "texts": an interleaved document
            return meta
    if "txt" in parts:
        return {"caption": _utf8(parts["txt"])}
    raise SampleError(errors.MISSING_TEXT)


def image_bytes(parts: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    for ext in REFUSED_EXTENSIONS:
        if ext in parts:
            raise SampleError(errors.UNSUPPORTED_IMAGE, ext)
    return None


class SampleProcessor:
    def __init__(self, text: TextProcessor, image_transform: Callable[[Image.Image], torch.Tensor],
                 max_image_pixels: int, draft_size: int | None = None) -> None:
        self.text = text
        self.image_transform = image_transform
        self.max_image_pixels = max_image_pixels
        self.draft_size = draft_size

    def __call__(self, parts: dict[str, bytes]) -> ProcessedSample:
        meta = read_metadata(parts)
        if is_interleaved(meta):  # text and images in document order
            doc = process_document(self, meta, parts)
            return ProcessedSample(doc.tokens.input_ids, doc.tokens.labels, doc.pixels, doc.tokens.truncated)
        data = image_bytes(parts)
        if data is None and meta.get("image"):
            raise SampleError(errors.MISSING_IMAGE, str(meta.get("image")))
        has_image = data is not None
        if "conversations" in meta:
            tokens = self.text.conversation(meta["conversations"], has_image)
        elif isinstance(meta.get("caption"), str):
            if not has_image:
                raise SampleError(errors.MISSING_IMAGE, "a caption sample without an image")
            tokens = self.text.caption(meta["caption"])
        else:
            raise SampleError(errors.MISSING_TEXT, "caption is not a string")
        pixels = None
        if has_image:
            image = decode_image(data, max_pixels=self.max_image_pixels, draft_size=self.draft_size)
            pixels = self.image_transform(image)
        return ProcessedSample(tokens.input_ids, tokens.labels, pixels, tokens.truncated)
