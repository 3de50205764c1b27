"""Image bytes -> RGB picture -> the vision tower's pixel values, as its Hugging Face image processor makes them.

Decoding (`decode_image`), each bad input raising `SampleError` with one reason:
- empty or undecodable bytes (random data, an HTML error page saved as .jpg) -> `corrupt_image`;
- bytes that end before the picture does -> `truncated_image`, whatever Pillow's process-wide
  `ImageFile.LOAD_TRUNCATED_IMAGES` says (we never set it; with it on, Pillow pads silently, so our reader notes a read
  past the end of the data itself, and a WebP's RIFF header says how long the file should be);
- more pixels than `max_pixels` in the header -> `decompression_bomb`, before any pixel is decoded. Pillow's own
  process-wide `Image.MAX_IMAGE_PIXELS` (which we never change) applies as well: Pillow warns above it and raises
  `DecompressionBombError` above twice it; both ranges are rejected as bombs here;
- SVG, HEIC, PDF, JPEG XL, gzip, formats Pillow knows but outside `image_formats.ACCEPTED` (e.g. EPS, which would
  run Ghostscript) and colour modes that cannot become RGB -> `unsupported_image_format`.
Animated images (GIF, APNG, WebP) give their first frame. The EXIF orientation is applied, as transformers'
`load_image` does. ICC profiles are ignored, as in transformers.

Colour modes -> RGB: `to_rgb` (pretrain.data.image_formats, with the table of accepted and refused formats).

`ImageTransform` then reproduces the processor of the vision tower: see `image_processors.py` for how.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from pretrain.data.errors import (
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    TRUNCATED_IMAGE,
    UNSUPPORTED_IMAGE,
    SampleError,
)
from pretrain.data.image_formats import (
    ACCEPTED,
    DEFAULT_MAX_PIXELS,
    STREAMED_FORMATS,
    PastEndReader,
    failure_reason,
    sniff_refused,
    to_rgb,
)
from pretrain.data.image_processors import (
    TORCHVISION_BACKEND,
    PreprocessSpec,
    image_processor_for_vision_config,
    resize_torch,
    spec_from_processor,
)

__all__ = ["FORMATS", "ImageTransform", "decode_image", "image_processor_for_vision_config"]

# What Pillow may open: the accepted table (MPO files open through the JPEG plugin), so a refused format fails to
# open without its plugin running.
FORMATS = tuple(f for f in ACCEPTED if f != "MPO")
_EXIF_ORIENTATION = 0x0112


def _unidentified(data: bytes) -> SampleError:
    name = sniff_refused(data)
    if name is None:
        try:  # a format Pillow knows but we refuse; only its header is parsed here
            with Image.open(io.BytesIO(data)) as probe:
                name = probe.format
        except Exception:
            return SampleError(CORRUPT_IMAGE, "not a recognised image")
    return SampleError(UNSUPPORTED_IMAGE, str(name))


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise SampleError(CORRUPT_IMAGE, f"image size {width}x{height}")
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise SampleError(DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} pixels > {limit}")


def _open(reader: PastEndReader, data: bytes) -> Image.Image:
    try:
        return Image.open(reader, formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise SampleError(DECOMPRESSION_BOMB, str(e)) from None
    except Image.UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as e:  # Pillow's plugins raise many kinds on malformed headers
        raise SampleError(failure_reason(e, data), f"{type(e).__name__}: {e}") from None


def _load(img: Image.Image, reader: PastEndReader, data: bytes) -> None:
    reader.past_end = False
    try:
        img.load()
    except Exception as e:
        raise SampleError(failure_reason(e, data), f"{type(e).__name__}: {e}") from None
    if reader.past_end and img.format in STREAMED_FORMATS:
        raise SampleError(TRUNCATED_IMAGE, f"{img.format} data ends before the image does")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # broken EXIF: keep the pixels as stored
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    exif_orientation: bool = True,
) -> Image.Image:
    """Decode image bytes into an RGB picture (first frame), or raise `SampleError` saying why not.

    `draft_size`: for JPEGs at least twice that size on both edges, let libjpeg decode at 1/2, 1/4 or 1/8 scale
    (`Image.draft`), keeping both edges >= draft_size. Much faster for large photos; pixels differ slightly from a
    full decode followed by the same resize.
    """
    if not data:
        raise SampleError(CORRUPT_IMAGE, "empty image bytes")
    reader = PastEndReader(data)
    img = _open(reader, data)
    _check_pixels(img.size, max_pixels)  # header only: no pixel decoded yet
    if draft_size and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))
    _load(img, reader, data)
    if exif_orientation:
        img = _apply_exif_orientation(img)
    return to_rgb(img)


class ImageTransform:
    """PIL picture -> float32 (3, H, W) tensor, equal to what the vision tower's image processor gives.

    The processor's steps are redone without its overheads: resize and crop on uint8 (in Pillow for the PIL backend,
    torch's antialiased interpolate for the torchvision backend, as the processor itself does), then one lookup per
    pixel in a table of the processor's own rescale/normalise results. Inputs are always made RGB first (`to_rgb`).
    `fast=True` trades exactness for speed: `decode` lets large JPEGs be DCT-downscaled while decoding (see
    `decode_image`), and (PIL backend) the resize computes only the pixels the centre crop keeps (Pillow's `box`).
    """

    def __init__(self, spec: PreprocessSpec, *, fast: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec = spec
        self.fast = fast
        self.max_pixels = max_pixels

    @classmethod
    def from_processor(cls, processor: Any, **kwargs: Any) -> ImageTransform:
        """From a transformers CLIP/SigLIP image processor (PIL or torchvision backend) or any standard one."""
        return cls(spec_from_processor(processor), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str | None = None, **kwargs: Any) -> ImageTransform:
        """From a local directory holding `preprocessor_config.json`, loaded by `AutoImageProcessor`.

        `backend=None` takes the backend `AutoImageProcessor` picks (torchvision when installed, else PIL).
        """
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(os.fspath(path), backend=backend)
        return cls.from_processor(processor, **kwargs)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None if it follows the input's aspect ratio."""
        return self.spec.output_size()

    @property
    def draft_size(self) -> int | None:
        """The `draft_size` that `decode` passes to `decode_image` in fast mode (None: never drafts)."""
        return self.spec.draft_size() if self.fast else None

    def decode(self, data: bytes) -> torch.Tensor:
        """Image bytes -> pixel values; raises `SampleError` for bad bytes."""
        return self(decode_image(data, max_pixels=self.max_pixels, draft_size=self.draft_size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        spec = self.spec
        img = to_rgb(img)
        if spec.backend == TORCHVISION_BACKEND:
            chw = self._resize_crop_torch(img).numpy()
            channels = [chw[c] for c in range(3)]
        else:
            hwc = np.asarray(self._resize_crop_pil(img))
            channels = [hwc[:, :, c] for c in range(3)]
        out = np.empty((3, *channels[0].shape), dtype=np.float32)
        for c, plane in enumerate(channels):
            np.take(spec.lut[c], plane, out=out[c])
        return torch.from_numpy(out)

    def _resize_crop_pil(self, img: Image.Image) -> Image.Image:
        spec = self.spec
        if spec.resize is not None:
            height, width = spec.resized_size(img.height, img.width)
            box = spec.crop_box(height, width)
            if self.fast and box is not None and box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height:
                # resample only the part that the crop keeps (Pillow's box): up to ~2 levels off the exact path
                sx, sy = img.width / width, img.height / height
                source = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                return img.resize((box[2] - box[0], box[3] - box[1]), resample=spec.resample, box=source)
            img = img.resize((width, height), resample=spec.resample)
        box = spec.crop_box(img.height, img.width)
        if box is not None:
            img = img.crop(box)  # outside the picture Pillow fills zeros, as transformers pads with zeros
        return img

    def _resize_crop_torch(self, img: Image.Image) -> torch.Tensor:
        spec = self.spec
        chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        if spec.resize is not None:
            size = spec.resized_size(img.height, img.width)
            chw = resize_torch(chw, size, spec.resample)
        box = spec.crop_box(chw.shape[1], chw.shape[2])
        if box is None:
            return chw
        left, top, right, bottom = box
        out = torch.zeros((3, bottom - top, right - left), dtype=torch.uint8)
        src_top, src_left = max(top, 0), max(left, 0)
        src_bottom, src_right = min(bottom, chw.shape[1]), min(right, chw.shape[2])
        out[:, src_top - top : src_bottom - top, src_left - left : src_right - left] = chw[
            :, src_top:src_bottom, src_left:src_right
        ]
        return out

    def __repr__(self) -> str:
        s = self.spec
        return f"ImageTransform(backend={s.backend}, resize={s.resize}, crop={s.crop}, fast={self.fast})"
