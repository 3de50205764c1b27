"""One raw WebDataset sample -> model inputs: decoded, preprocessed images + token ids and labels.

A sample is `KEY.<image ext>` + `KEY.json` (`caption` or `conversations`) and/or `KEY.txt` (a caption). A sample with
several images stores them as `KEY.0.<ext>`, `KEY.1.<ext>`, ... in the order of their `<image>` placeholders; a
sample with none is text only (a conversation). A clip is `KEY.mp4` (or another container of VIDEO_EXTENSIONS), its
sampled frames going through the tower like image tiles and its tokens replacing the one `<video>` placeholder.
Anything unusable raises SampleError with its reason; the loader skips and counts it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pretrain.data import errors
from pretrain.data.errors import SampleError
from pretrain.data.image import decode_image
from pretrain.data.image_formats import IMAGE_EXTENSIONS, REFUSED_EXTENSIONS
from pretrain.data.interleaved import is_interleaved, process_document
from pretrain.data.text import TextProcessor
from pretrain.data.video import VIDEO_EXTENSIONS, clip_frames

_NUMBERED = re.compile(r"^(\d+)\.([^.]+)$")  # `0.jpg` of `KEY.0.jpg`


@dataclass
class ProcessedSample:
    """`pixel_values`: None, or the tiles of all the sample's images, (tiles, 3, H, W), images in placeholder order
    and each image's tiles contiguous (one tile per image when tiling is none). `image_tiles[i]` is image i's tile
    count and `image_sizes[i]` its original (height, width). A sample's vision cost is `pixel_values.shape[0]`."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    truncated: bool = False
    image_tiles: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    # The clip's sampled frames, (frames, 3, S, S) at the tower's size, or None; they run through the tower with the
    # image tiles and count against data.max_images_per_batch like them.
    video_pixels: torch.Tensor | None = None

    @property
    def n_images(self) -> int:
        return len(self.image_tiles) if self.image_tiles else int(self.pixel_values is not None)

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


def all_image_bytes(parts: dict[str, bytes]) -> list[bytes]:
    """The sample's images in placeholder order: `KEY.<ext>` alone, or `KEY.0.<ext>` ... `KEY.{N-1}.<ext>`.
    A gap in the numbering is a missing image; both layouts at once cannot be ordered."""
    numbered: dict[int, bytes] = {}
    for name, data in parts.items():
        m = _NUMBERED.match(name)
        if m is None:
            continue
        if m.group(2) in REFUSED_EXTENSIONS:
            raise SampleError(errors.UNSUPPORTED_IMAGE, name)
        if m.group(2) in IMAGE_EXTENSIONS:
            if int(m.group(1)) in numbered:
                raise SampleError(errors.IMAGE_COUNT_MISMATCH, f"two images numbered {int(m.group(1))}")
            numbered[int(m.group(1))] = data
    single = image_bytes(parts)
    if single is not None and numbered:
        raise SampleError(errors.IMAGE_COUNT_MISMATCH, "both KEY.<ext> and KEY.<n>.<ext> images")
    if single is not None:
        return [single]
    gaps = [i for i in range(max(numbered, default=-1) + 1) if i not in numbered]
    if gaps:
        raise SampleError(errors.MISSING_IMAGE, f"image {gaps[0]} of {max(numbered) + 1}")
    return [numbered[i] for i in sorted(numbered)]


KINDS = ("image", "images", "video", "interleaved", "text")


def sample_kind(parts: dict[str, bytes | str]) -> str:
    """A shard sample's kind from its part names (and its KEY.json for interleaved documents): one of KINDS. A clip
    makes a video sample whatever images come with it."""
    exts = [name.rsplit(".", 1)[-1] for name in parts if not name.startswith("__")]
    if any(e in VIDEO_EXTENSIONS for e in exts):
        return "video"
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
    except (ValueError, TypeError):
        meta = {}
    if isinstance(meta, dict) and is_interleaved(meta):
        return "interleaved"
    n = sum(e in IMAGE_EXTENSIONS for e in exts)
    return "text" if n == 0 else "image" if n == 1 else "images"


def expected_images(meta: dict) -> int:
    """How many images the metadata names (LLaVA's `"image": a` or `[a, b]`); 0 when it names none."""
    named = meta.get("image")
    if isinstance(named, list):
        return len(named)
    return 1 if named else 0


def video_part(parts: dict[str, bytes]) -> bytes | None:
    """The sample's clip bytes, or None."""
    clips = [ext for ext in VIDEO_EXTENSIONS if ext in parts]
    if len(clips) > 1:
        raise SampleError(errors.MISSING_VIDEO, f"{len(clips)} clips in one sample ({', '.join(clips)})")
    return parts[clips[0]] if clips else None


@dataclass
class VideoSampling:
    """How a clip becomes model input: at most `frames` frames (or one per 1/`fps` s, capped by `frames`), each
    made tower-size pixels by `transform` (an RGB uint8 (H, W, 3) array -> (3, S, S)) and `tokens_per_frame`
    decoder positions after pooling."""

    frames: int
    fps: float | None
    transform: Callable[[np.ndarray], torch.Tensor]
    tokens_per_frame: int


class SampleProcessor:
    """Raw parts -> ProcessedSample. `image_transform` makes one image's pixel values: (3, H, W) for one tile, or
    (tiles, 3, H, W) (AnyRes); `image_token_count(height, width)` its decoder positions (None: the text side's fixed
    count). `max_image_tiles` caps a sample's tiles (None: no cap)."""

    def __init__(self, text: TextProcessor, image_transform: Callable[[Image.Image], torch.Tensor],
                 max_image_pixels: int, draft_size: int | None = None,
                 image_token_count: Callable[[int, int], int] | None = None,
                 max_image_tiles: int | None = None, video: VideoSampling | None = None) -> None:
        self.text = text
        self.image_transform = image_transform
        self.max_image_pixels = max_image_pixels
        self.draft_size = draft_size
        self.image_token_count = image_token_count
        self.max_image_tiles = max_image_tiles
        self.video = video  # None: video samples are skipped (video_off)

    def __call__(self, parts: dict[str, bytes]) -> ProcessedSample:
        meta = read_metadata(parts)
        encoded = all_image_bytes(parts)
        clip = video_part(parts)
        if clip is not None and self.video is None:
            raise SampleError(errors.VIDEO_OFF, "data.video_frames is 0")
        if is_interleaved(meta):  # text and images in document order
            doc = process_document(self, meta, encoded)
            return ProcessedSample(doc.tokens.input_ids, doc.tokens.labels, doc.pixels, doc.tokens.truncated,
                                   doc.image_tiles, doc.image_sizes)
        if len(encoded) < expected_images(meta):
            raise SampleError(errors.MISSING_IMAGE, f"{len(encoded)} of {expected_images(meta)} images: "
                                                    f"{str(meta.get('image')):.120}")
        if "conversations" not in meta and not isinstance(meta.get("caption"), str):
            raise SampleError(errors.MISSING_TEXT, "caption is not a string")
        if "conversations" not in meta and not encoded and clip is None:
            raise SampleError(errors.MISSING_IMAGE, "a caption sample without an image")
        pixels, sizes, counts = self.decode_images(encoded)
        frames = self.decode_video(clip) if clip is not None else None
        video_tokens = 0 if frames is None else frames.shape[0] * self.video.tokens_per_frame
        if "conversations" in meta:
            tokens = self.text.conversation(meta["conversations"], counts, video_tokens)
        else:
            tokens = self.text.caption(meta["caption"], counts, video_tokens)
        tiles = [p.shape[0] for p in pixels]
        stacked = torch.cat(pixels) if pixels else None
        return ProcessedSample(tokens.input_ids, tokens.labels, stacked, tokens.truncated, tiles, sizes, frames)

    def decode_video(self, data: bytes) -> torch.Tensor:
        """The clip's sampled frames as tower pixels, (frames, 3, S, S), decoded by seeking (pretrain.data.video)."""
        v = self.video
        frames, _, _ = clip_frames(data, v.frames, v.fps, self.max_image_pixels)
        return torch.stack([v.transform(f) for f in frames])

    def decode_images(self, encoded: list[bytes]) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[int]]:
        """Decoded and transformed images in order: (pixels (tiles, 3, H, W) each, (height, width) each, token
        counts). The tile cap is checked as tiles add up, so an over-budget sample stops decoding early."""
        pixels, sizes, counts, total = [], [], [], 0
        for data in encoded:
            image = decode_image(data, max_pixels=self.max_image_pixels, draft_size=self.draft_size)
            px = self.image_transform(image)
            px = px[None] if px.dim() == 3 else px
            total += px.shape[0]
            if self.max_image_tiles is not None and total > self.max_image_tiles:
                raise SampleError(errors.TOO_MANY_TILES, f"more than model.max_image_tiles={self.max_image_tiles} "
                                                         f"tiles in {len(encoded)} image(s)")
            size = (image.height, image.width)
            pixels.append(px)
            sizes.append(size)
            counts.append(self.text.image_tokens if self.image_token_count is None else self.image_token_count(*size))
        return pixels, sizes, counts
