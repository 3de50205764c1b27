"""Checking image bytes at shard-build time: what format they are, whether a trainer will be able to decode them.

The check is as cheap as the format allows, because a converter runs it over every image of a data set:
- PNG: `Image.verify()` walks the chunks and checks their CRCs (catches truncation and corruption, no pixel decode).
- JPEG: the header is parsed and the end-of-image marker must be present (catches the common truncated download).
  Corrupt entropy-coded data inside a complete JPEG is only found by `full_decode=True`.
- Anything else we accept (WebP, GIF, BMP, TIFF) is rare in VLM data: it is fully decoded.
Formats a trainer cannot use (SVG, HEIC, ...) are reported as unsupported rather than corrupt, so the user knows a
conversion step would save them.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

from pretrain.data.errors import (
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    TRUNCATED_IMAGE,
    UNSUPPORTED_IMAGE,
    SampleError,
)

# Pillow format name -> the WebDataset extension the shard stores the bytes under.
FORMAT_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif", "bmp", "tiff")
# File suffixes the folder converter treats as images (svg/heic included so they are reported, not silently ignored).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".svg", ".heic", ".heif", ".avif"}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold; the same default as data.max_image_pixels
REENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _message(e: Exception) -> str:
    """An error message without object addresses, so manifests stay byte-identical between runs."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", f"{type(e).__name__}: {e}")


def _sniff_unsupported(data: bytes) -> str | None:
    """Name a known-but-unsupported format from its leading bytes (Pillow cannot identify these)."""
    head = data[:4096].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "svg"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"avif", b"avis"):
        return data[8:12].decode()
    if head.startswith(b"%pdf"):
        return "pdf"
    return None


def _jpeg_complete(data: bytes) -> bool:
    # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so FF D9 near the end is the EOI
    # marker; a few cameras append padding or metadata after it, hence the search window.
    return b"\xff\xd9" in data[-1024:]


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> tuple[str, int, int]:
    """Validate image bytes; return (extension, width, height) or raise SampleError with the reason."""
    if not data:
        raise SampleError(CORRUPT_IMAGE, "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise SampleError(DECOMPRESSION_BOMB, _message(e)) from None
        except Exception as e:  # Pillow raises UnidentifiedImageError, SyntaxError, OSError, ValueError...
            kind = _sniff_unsupported(data)
            if kind:
                raise SampleError(UNSUPPORTED_IMAGE, kind) from None
            raise SampleError(CORRUPT_IMAGE, _message(e)) from None
        fmt, (width, height) = image.format, image.size
        if fmt not in FORMAT_EXTENSIONS:
            raise SampleError(UNSUPPORTED_IMAGE, str(fmt))
        if width * height > max_pixels:
            raise SampleError(DECOMPRESSION_BOMB, f"{width}x{height} > {max_pixels} pixels")
        if width < 1 or height < 1:
            raise SampleError(CORRUPT_IMAGE, f"size {width}x{height}")
        _verify(data, image, fmt, full_decode)
    return FORMAT_EXTENSIONS[fmt], width, height


def _verify(data: bytes, image: Image.Image, fmt: str, full_decode: bool) -> None:
    try:
        if fmt in ("JPEG", "MPO") and not _jpeg_complete(data):
            raise SampleError(TRUNCATED_IMAGE, "no JPEG end-of-image marker")
        if fmt == "PNG" and not full_decode:
            image.verify()
        elif fmt not in ("JPEG", "MPO") or full_decode:
            Image.open(io.BytesIO(data)).load()  # verify() leaves the image unusable: decode from a fresh open
    except SampleError:
        raise
    except Exception as e:
        message = _message(e)
        reason = TRUNCATED_IMAGE if "truncat" in message.lower() else CORRUPT_IMAGE
        raise SampleError(reason, message) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for re-encoding: alpha is composited onto white, 16-bit and float greyscale are scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def reencode(data: bytes, ext: str, quality: int = 95, max_side: int | None = None) -> bytes:
    """Decode `data` and encode it as `ext` (jpg/png/webp) in RGB, shrinking the long side to `max_side` if larger."""
    if ext not in REENCODE_FORMATS:
        raise ValueError(f"cannot re-encode to {ext!r}; valid: {sorted(REENCODE_FORMATS)}")
    try:
        image = to_rgb(Image.open(io.BytesIO(data)))
    except Exception as e:
        raise SampleError(CORRUPT_IMAGE, _message(e)) from None
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    options = {"quality": quality} if ext in ("jpg", "webp") else {"compress_level": 6}
    image.save(buf, format=REENCODE_FORMATS[ext], **options)
    return buf.getvalue()
