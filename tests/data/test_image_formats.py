"""pretrain.data.image_formats: one table of accepted and refused image formats; the build-time check
(pretrain.shards.image_check), the runtime decoder (pretrain.data.image) and the sample's extension list must agree
on every format in it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pretrain.data.errors import TRUNCATED_IMAGE, UNSUPPORTED_IMAGE, SampleError
from pretrain.data.image import decode_image
from pretrain.data.image_formats import ACCEPTED, IMAGE_EXTENSIONS, REFUSED_EXTENSIONS, sniff_refused
from pretrain.data.sample import image_bytes
from pretrain.shards.image_check import IMAGE_SUFFIXES, check_image, reencode

# Formats Pillow can write but we refuse, and formats Pillow cannot even identify (named from their first bytes).
PILLOW_REFUSED = ("EPS", "PCX", "SGI", "IM")
SNIFFED = {
    "SVG": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
    "HEIF": b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64,
    "PDF": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    "JPEG XL": b"\xff\x0a" + b"\x00" * 64,
    "gzip (e.g. SVGZ)": b"\x1f\x8b\x08\x00" + b"\x00" * 64,
}


def _encode(fmt: str, mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> bytes:
    """Noise (so a cut really removes pixel data) in `fmt`; MPO as a real two-frame file."""
    rng = np.random.default_rng(0)
    bands = len(Image.new(mode, (1, 1)).getbands())
    array = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if bands == 1 else array, mode)
    buf = io.BytesIO()
    extra = {"save_all": True, "append_images": [image.rotate(90)]} if fmt == "MPO" else {}
    image.save(buf, format=fmt, **extra)
    return buf.getvalue()


def _reason(fn, data: bytes) -> tuple[str, str]:
    with pytest.raises(SampleError) as err:
        fn(data)
    return err.value.reason, err.value.detail


@pytest.mark.parametrize("fmt", sorted(ACCEPTED))
def test_every_accepted_format_is_accepted_by_both_and_cut_files_by_neither(fmt: str) -> None:
    data = _encode(fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # the case really is that format
    ext, width, height = check_image(data)
    assert ext == ACCEPTED[fmt] and ext in IMAGE_EXTENSIONS
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (width, height)
    cut = data[: len(data) // 2]
    build, runtime = _reason(check_image, cut)[0], _reason(decode_image, cut)[0]
    assert build == runtime, (fmt, build, runtime)


@pytest.mark.parametrize("fmt", PILLOW_REFUSED)
def test_formats_pillow_knows_but_we_refuse_are_refused_by_both(fmt: str) -> None:
    data = _encode(fmt, size=(8, 8))
    assert fmt not in ACCEPTED and Image.open(io.BytesIO(data)).format == fmt
    assert _reason(check_image, data) == _reason(decode_image, data) == (UNSUPPORTED_IMAGE, fmt)


@pytest.mark.parametrize("name", sorted(SNIFFED))
def test_formats_pillow_cannot_identify_are_named_by_both(name: str) -> None:
    data = SNIFFED[name]
    assert sniff_refused(data) == name
    assert _reason(check_image, data) == _reason(decode_image, data) == (UNSUPPORTED_IMAGE, name)


def test_a_cut_jpeg_is_truncated_for_both() -> None:
    data = _encode("JPEG", size=(200, 160))
    cut = data[: len(data) * 3 // 4]
    assert _reason(check_image, cut)[0] == _reason(decode_image, cut)[0] == TRUNCATED_IMAGE


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "I;16"), ("WEBP", "RGBA"), ("TIFF", "CMYK")])
def test_reencoding_keeps_the_pixels_training_sees(fmt: str, mode: str) -> None:
    """Re-encoding at build time goes through the same `to_rgb` as decoding at run time."""
    if mode == "I;16":
        buf = io.BytesIO()
        Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).save(buf, format=fmt)
        data = buf.getvalue()
    else:
        data = _encode(fmt, mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    rebuilt = decode_image(reencode(data, "png"))  # PNG is lossless: only the colour conversion can differ
    assert np.array_equal(np.asarray(rebuilt), np.asarray(decode_image(data)))


def test_the_sample_reads_every_accepted_extension_and_names_the_refused() -> None:
    png = _encode("PNG")
    for ext in IMAGE_EXTENSIONS:
        assert image_bytes({ext: png, "json": b"{}"}) == png
        assert f".{ext}" in IMAGE_SUFFIXES  # the folder converter picks it up
    for ext in REFUSED_EXTENSIONS:
        assert _reason(image_bytes, {ext: b"x"}) == (UNSUPPORTED_IMAGE, ext)
        assert f".{ext}" in IMAGE_SUFFIXES  # reported, not ignored
