"""Checking image bytes at shard-build time: what format they are, whether a trainer will be able to decode them.

The check is as cheap as the format allows, because a converter runs it over every image of a data set:
- PNG: `Image.verify()` walks the chunks and checks their CRCs (catches truncation and corruption, no pixel decode).
- JPEG: the header is parsed and the end-of-image marker must be present (catches the common truncated download).
  Corrupt entropy-coded data inside a complete JPEG is only found by `full_decode=True`.
- Anything else we accept (WebP, GIF, BMP, TIFF, AVIF, ...) is rare in VLM data: it is fully decoded.
What is accepted is `pretrain.data.image_formats.ACCEPTED`, the runtime decoder's table. Formats a trainer cannot use
(SVG, HEIC, EPS, ...) are reported as unsupported rather than corrupt, so the user knows a conversion step would save
them.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

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
    IMAGE_EXTENSIONS,
    REFUSED_EXTENSIONS,
    STREAMED_FORMATS,
    PastEndReader,
    failure_reason,
    sniff_refused,
    to_rgb,
)

# File suffixes the folder converter treats as images (refused ones included so they are reported, not ignored).
IMAGE_SUFFIXES = {f".{ext}" for ext in (*IMAGE_EXTENSIONS, *REFUSED_EXTENSIONS)}
REENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _message(e: Exception) -> str:
    """An error message without object addresses, so manifests stay byte-identical between runs."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", f"{type(e).__name__}: {e}")


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
        except Image.UnidentifiedImageError as e:
            kind = sniff_refused(data)
            if kind:
                raise SampleError(UNSUPPORTED_IMAGE, kind) from None
            raise SampleError(CORRUPT_IMAGE, _message(e)) from None
        except Exception as e:  # Pillow's plugins raise SyntaxError, OSError, ValueError... on malformed headers
            raise SampleError(failure_reason(e, data), _message(e)) from None
        fmt, (width, height) = image.format, image.size
        if fmt not in ACCEPTED:
            raise SampleError(UNSUPPORTED_IMAGE, str(fmt))
        if width * height > max_pixels:
            raise SampleError(DECOMPRESSION_BOMB, f"{width}x{height} > {max_pixels} pixels")
        if width < 1 or height < 1:
            raise SampleError(CORRUPT_IMAGE, f"size {width}x{height}")
        _verify(data, image, fmt, full_decode)
    return ACCEPTED[fmt], width, height


def _verify(data: bytes, image: Image.Image, fmt: str, full_decode: bool) -> None:
    try:
        if fmt in ("JPEG", "MPO") and not _jpeg_complete(data):
            raise SampleError(TRUNCATED_IMAGE, "no JPEG end-of-image marker")
        if fmt == "PNG" and not full_decode:
            image.verify()
        elif fmt not in ("JPEG", "MPO") or full_decode:
            reader = PastEndReader(data)  # verify() leaves the image unusable: decode from a fresh open
            Image.open(reader).load()
            if reader.past_end and fmt in STREAMED_FORMATS:  # the decoder's reading, as at training time
                raise SampleError(TRUNCATED_IMAGE, f"{fmt} data ends before the image does")
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(failure_reason(e, data), _message(e)) from None


def reencode(data: bytes, ext: str, quality: int = 95, max_side: int | None = None) -> bytes:
    """Decode `data` and encode it as `ext` (jpg/png/webp) in RGB, shrinking the long side to `max_side` if larger."""
    if ext not in REENCODE_FORMATS:
        raise ValueError(f"cannot re-encode to {ext!r}; valid: {sorted(REENCODE_FORMATS)}")
    try:
        image = to_rgb(Image.open(io.BytesIO(data)))
    except SampleError:  # a colour mode that has no RGB form
        raise
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
