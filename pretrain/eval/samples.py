"""Validation samples as evaluation needs them: the decoded image and the references (caption, question/answer
pairs, synthetic attributes) that the training batches do not carry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pretrain.config import DataSource
from pretrain.data.errors import SampleError
from pretrain.data.image import decode_image
from pretrain.data.sample import image_bytes, read_metadata
from pretrain.data.stream import ShardReader
from pretrain.data.urls import expand_urls

log = logging.getLogger(__name__)


@dataclass
class EvalSample:
    key: str
    parts: dict[str, bytes]  # the raw sample, for the training preprocessing (validation loss)
    image: Image.Image
    caption: str | None  # the reference caption (None for conversation-only samples)
    qa: list[dict[str, str]] = field(default_factory=list)  # [{"question": ..., "answer": ...}]
    attributes: dict[str, Any] | None = None  # synthetic shapes ground truth


def _caption_of(meta: dict) -> str | None:
    if isinstance(meta.get("caption"), str):
        return meta["caption"].strip() or None
    return None


def read_eval_samples(sources: list[DataSource], limit: int) -> list[EvalSample]:
    """The first `limit` usable samples with an image, in shard order (deterministic); unusable ones are skipped
    and counted in the log, as the loader would."""
    reader, out, skipped = ShardReader(), [], 0
    for source in sources:
        for url in expand_urls(source.urls):
            for raw in reader.iterate(url):
                if len(out) >= limit:
                    break
                try:
                    meta = read_metadata(raw.parts)
                    data = image_bytes(raw.parts)
                    if data is None:
                        continue
                    image = decode_image(data)
                except SampleError:
                    skipped += 1
                    continue
                qa = [q for q in meta.get("qa", []) if isinstance(q, dict) and "question" in q and "answer" in q]
                attrs = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else None
                out.append(EvalSample(raw.key, raw.parts, image, _caption_of(meta), qa, attrs))
    if skipped:
        log.warning("eval: skipped %d unusable samples", skipped)
    return out
