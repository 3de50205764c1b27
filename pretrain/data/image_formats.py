"""Which image formats a shard may hold, and the one colour-mode conversion to RGB.

One table serves the build-time check (`pretrain.shards.image_check`), the runtime decoder (`pretrain.data.image`)
and the extensions a sample's image is looked up under (`pretrain.data.sample`), so a shard the builder accepts is
one the trainer decodes, and the other way round.

Colour modes -> RGB (`to_rgb`), the rules of transformers' `convert_to_rgb` where it has one:
- RGB: as is.
- a band named "A" (RGBA, LA, PA) or a `transparency` entry (P or L with a transparent index, RGB PNG with tRNS):
  converted to RGBA by Pillow, then alpha-composited onto white (255, 255, 255).
- 1, L, P, CMYK, YCbCr, RGBX, premultiplied RGBa: Pillow's `convert("RGB")` (grey replicated to the three
  channels; CMYK by Pillow's formula, the Adobe inverted CMYK of JPEGs undone by its decoder).
- LAB (CIELab TIFFs): LittleCMS's LAB -> sRGB transform (Pillow's `convert("RGB")`, hence transformers, would
  copy the L, a, b bands into R, G, B). Modes Pillow cannot convert -> `unsupported_image_format`.
- 16-bit and wider greyscale, where Pillow and transformers would clip everything above 255 to white: I;16 (and its
  byte orders) is scaled to 8 bits as round(v / 257) (65535 -> 255, exact inverse of 8-bit v * 257); I (32-bit int)
  the same when its values lie in 0..65535, otherwise min-max stretched to 0..255; F (float) as round(v * 255) when in
  [0, 1], otherwise min-max stretched (NaN -> 0). Then replicated like L. A transparency key of these modes is ignored.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image

from pretrain.data.errors import CORRUPT_IMAGE, TRUNCATED_IMAGE, UNSUPPORTED_IMAGE, SampleError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS; the default of data.max_image_pixels
# Pillow format name -> the extension a shard stores its bytes under. Everything else Pillow knows (EPS, which
# would run Ghostscript, WMF, PSD, PCX, SGI, ...) is refused as unsupported.
ACCEPTED = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "DIB": "bmp",
    "TIFF": "tiff", "PPM": "ppm", "TGA": "tga", "ICO": "ico", "JPEG2000": "jp2", "AVIF": "avif", "QOI": "qoi",
}
# Extensions a sample's image may be stored under: the table's, then other spellings of the same files.
IMAGE_EXTENSIONS = (*dict.fromkeys(ACCEPTED.values()), "jpeg", "tif")
# Extensions of formats we refuse: a sample holding only these is `unsupported_image_format`, not `missing_image`,
# and a folder converter reports them instead of ignoring them.
REFUSED_EXTENSIONS = ("svg", "svgz", "eps", "pdf", "heic", "heif", "jxl")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")
# Formats whose decoders pull their data through the reader, so that a read past its end means truncation.
STREAMED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO"})
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def sniff_refused(data: bytes) -> str | None:
    """Name of a known image-like format that Pillow cannot identify and we refuse, from its first bytes."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") or head.startswith(b"<!doctype")) and b"<svg" in head:
        return "SVG"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF"
    if data.startswith(b"%PDF"):
        return "PDF"
    if data.startswith(b"\xff\x0a") or data.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JPEG XL"
    if data.startswith(b"\x1f\x8b"):
        return "gzip (e.g. SVGZ)"
    return None


class PastEndReader(io.BytesIO):
    """BytesIO that notes a read past the end: how truncation shows when Pillow is told to load truncated images."""

    past_end = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not chunk and size != 0:
            self.past_end = True
        return chunk


def _webp_cut_short(data: bytes) -> bool:
    """A WebP's RIFF header gives its length; libwebp only says it 'could not create decoder object'."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def failure_reason(error: Exception, data: bytes) -> str:
    """`truncated_image` or `corrupt_image` for an error Pillow raised opening or decoding `data`."""
    cut = isinstance(error, EOFError) or "truncat" in str(error).lower() or _webp_cut_short(data)
    return TRUNCATED_IMAGE if cut else CORRUPT_IMAGE


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if img.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif img.mode == "I" and low >= 0.0 and high <= 65535.0:
            scaled = values / 257.0
        else:
            scaled = (values - low) * (255.0 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


@functools.lru_cache(maxsize=1)
def _lab_to_srgb() -> Any:
    from PIL import ImageCms

    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB by the rules in the module docstring (transformers' `convert_to_rgb` where it applies)."""
    if img.mode in _HIGH_DEPTH:
        img = _high_depth_to_l(img)
    try:
        if img.mode == "LAB":  # Pillow's convert("RGB") would copy the L, a, b bands as if they were R, G, B
            from PIL import ImageCms

            return ImageCms.applyTransform(img, _lab_to_srgb())
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, ImportError, OSError) as e:  # e.g. "conversion from La to L not supported", no littlecms
        raise SampleError(UNSUPPORTED_IMAGE, f"mode {img.mode}: {e}") from None
