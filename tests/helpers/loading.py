"""The sample processor of the loader tests (tiny tokenizer, the CLIP tower's image processor), counting the samples
it decodes, and shards read through `pipe:` commands."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoImageProcessor

from pretrain.data.image import ImageTransform
from pretrain.data.sample import SampleProcessor
from pretrain.data.text import TextProcessor


class CountingProcessor(SampleProcessor):
    """The real processor, counting the samples it decodes (in-process loaders only)."""

    calls = 0

    def __call__(self, parts):
        CountingProcessor.calls += 1
        return super().__call__(parts)


def counting_processor(tokenizer, vision_dir: Path) -> CountingProcessor:
    text = TextProcessor(tokenizer, tokenizer.convert_tokens_to_ids("<image>"), image_tokens=16, max_length=64)
    image = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(vision_dir))
    return CountingProcessor(text, image, max_image_pixels=10**7)


def pipe_urls(urls: list[str], log=None) -> list[str]:
    """The same shards as `pipe:` commands; with `log`, each run of a command appends a line to it."""
    prefix = f"echo run >> {log} && " if log else ""
    return [f"pipe:{prefix}cat {u}" for u in urls]
