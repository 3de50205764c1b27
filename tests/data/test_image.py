"""Image decoding, RGB conversion and parity of ImageTransform with the vision tower's own image processor."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    SiglipVisionConfig,
)
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

from pretrain.data.errors import (
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    TRUNCATED_IMAGE,
    UNSUPPORTED_IMAGE,
    SampleError,
)
from pretrain.data.image import ImageTransform, decode_image, image_processor_for_vision_config
from pretrain.data.image_formats import to_rgb
from pretrain.shards.synthetic import photo_like

SIZES = [(640, 480), (480, 640), (337, 1001), (1001, 337), (57, 43), (3, 2), (1, 1), (336, 336), (335, 337)]


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mode_images() -> dict[str, Image.Image]:
    """One picture per Pillow mode the loader can meet, with transparency where the mode has it."""
    rgb = photo_like(61, 47, seed=1)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 61, dtype=np.uint8), (47, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    p_trns = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_trns.info["transparency"] = 3
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "LA": la,
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
        "P+transparency": p_trns,
        "PA": rgba.convert("PA"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
    }


def high_depth_images() -> dict[str, Image.Image]:
    grey16 = (np.asarray(photo_like(61, 47, seed=2))[:, :, 0].astype(np.uint16) * 257).astype(np.uint16)
    return {
        "I;16": Image.fromarray(grey16),
        "I": Image.fromarray(grey16.astype(np.int32)),
        "F": Image.fromarray(grey16.astype(np.float32) / 65535.0),
    }


def saved_processor(tmp_path, vision_config):
    """Build the processor for a config, save it and load it back the way a run does (AutoImageProcessor)."""
    image_processor_for_vision_config(vision_config).save_pretrained(tmp_path)
    return AutoImageProcessor.from_pretrained(tmp_path)


def assert_parity(processor, transform: ImageTransform, images) -> None:
    for img in images:
        expected = processor(img, return_tensors="pt")["pixel_values"][0]
        got = transform(img)
        assert got.dtype == torch.float32 and got.shape == expected.shape, (img.size, img.mode)
        diff = (got - expected).abs().max().item()
        assert diff == 0.0, (img.size, img.mode, diff)  # bit-exact, not merely close


@pytest.mark.parametrize(
    "config",
    [CLIPVisionConfig(image_size=336), SiglipVisionConfig(image_size=224)],
    ids=["clip", "siglip"],
)
def test_parity_with_saved_processor(tmp_path, config):
    processor = saved_processor(tmp_path, config)
    transform = ImageTransform.from_pretrained(tmp_path)
    images = [photo_like(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    noise = np.random.default_rng(5).integers(0, 256, (301, 203, 3), dtype=np.uint8)
    images.append(Image.fromarray(noise))
    images += list(mode_images().values())  # the processor converts these modes by the same rules as ours
    assert_parity(processor, transform, images)
    side = config.image_size
    assert transform.output_size == (side, side)
    assert tuple(transform(images[0]).shape) == (3, side, side)


def test_parity_of_unusual_settings():
    images = [photo_like(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:6])]
    for kwargs in [
        {"size": {"shortest_edge": 100}, "crop_size": {"height": 131, "width": 91}},  # crop pads (odd) and cuts
        {"do_resize": False, "crop_size": {"height": 301, "width": 299}},
        {"size": {"shortest_edge": 100, "longest_edge": 150}, "do_center_crop": False},
        {"do_normalize": False, "resample": Image.Resampling.BILINEAR},
        {"do_rescale": False, "image_mean": [100.0, 110.0, 120.0], "image_std": [50.0, 60.0, 70.0]},
    ]:
        processor = CLIPImageProcessorPil(**kwargs)
        assert_parity(processor, ImageTransform.from_processor(processor), images)


def test_high_depth_greyscale_is_scaled_not_clipped():
    expected = np.asarray(photo_like(61, 47, seed=2))[:, :, 0]
    for mode, img in high_depth_images().items():
        rgb = np.asarray(to_rgb(img))
        assert rgb.shape == (47, 61, 3), mode
        assert np.array_equal(rgb[:, :, 0], expected) and np.array_equal(rgb[:, :, 2], expected), mode
    # out of the conventional ranges: stretched to 0..255
    wide = Image.fromarray(np.array([[-1000, 0, 3000]], dtype=np.int32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 64, 255]
    hdr = Image.fromarray(np.array([[0.0, 2.0, 4.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(hdr))[0, :, 1].tolist() == [0, 128, 255, 0]
    # and the transform of a 16-bit picture equals the processor fed our 8-bit conversion
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transform, img16 = ImageTransform.from_processor(processor), high_depth_images()["I;16"]
    assert_parity(processor, transform, [to_rgb(img16)])
    assert torch.equal(transform(img16), transform(to_rgb(img16)))


@pytest.mark.parametrize("mode", list(mode_images()))
def test_mode_conversion_matches_transformers(mode):
    img = mode_images()[mode]
    ours = np.asarray(to_rgb(img))
    assert ours.shape == (img.height, img.width, 3)
    assert np.array_equal(ours, hf_convert_to_rgb(img, return_numpy=True))


def test_transparency_goes_to_white_and_grey_is_replicated():
    rgba = Image.new("RGBA", (4, 1), (10, 200, 30, 0))
    rgba.putpixel((1, 0), (10, 200, 30, 255))
    assert np.asarray(to_rgb(rgba))[0].tolist() == [[255, 255, 255], [10, 200, 30]] + [[255, 255, 255]] * 2
    grey = np.asarray(to_rgb(Image.new("L", (2, 2), 77)))
    assert (grey == 77).all()
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure cyan-free magenta+yellow: red
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(SampleError) as err:
        to_rgb(Image.new("La", (2, 2)))  # premultiplied grey+alpha: Pillow has no conversion
    assert err.value.reason == UNSUPPORTED_IMAGE


def test_lab_goes_through_colour_management():
    from PIL import ImageCms

    rgb = photo_like(30, 20, seed=4)
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(rgb, to_lab)
    back = np.asarray(to_rgb(lab)).astype(int)
    assert lab.mode == "LAB" and np.abs(back - np.asarray(rgb)).mean() < 4


@pytest.mark.parametrize(
    "fmt,mode,kwargs",
    [
        ("JPEG", "RGB", {"quality": 95}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "LA", {}),
        ("PNG", "P", {}),
        ("PNG", "I;16", {}),
        ("WEBP", "RGBA", {"lossless": True}),
        ("TIFF", "F", {}),
        ("BMP", "RGB", {}),
    ],
)
def test_decode_files_of_every_mode(fmt, mode, kwargs):
    images = {**mode_images(), **high_depth_images()}
    img = images[mode]
    decoded = decode_image(encode(img, fmt, **kwargs))
    assert decoded.mode == "RGB" and decoded.size == img.size
    if fmt != "JPEG":  # lossless formats: the same pixels as converting the in-memory picture
        assert np.array_equal(np.asarray(decoded), np.asarray(to_rgb(img))), (fmt, mode)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    decoded = np.asarray(decode_image(data))
    assert decoded.shape == (10, 20, 3) and (decoded == [255, 0, 0]).all()


def test_exif_orientation_is_applied():
    img = photo_like(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)
    assert decode_image(encode(img, "JPEG", exif=exif.tobytes()), exif_orientation=False).size == (40, 20)


def png_with_header(width: int, height: int, payload: bytes = b"\x00" * 64) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", payload) + chunk(b"IEND", b"")


def reason(data: bytes, **kwargs) -> str:
    with pytest.raises(SampleError) as err:
        decode_image(data, **kwargs)
    return err.value.reason


def test_bad_inputs_are_classified():
    img = photo_like(300, 200)
    jpeg, png, gif = encode(img, "JPEG"), encode(img, "PNG"), encode(img, "GIF")
    webp = encode(img, "WEBP")
    assert reason(b"") == CORRUPT_IMAGE
    assert reason(np.random.default_rng(0).bytes(5000)) == CORRUPT_IMAGE
    assert reason(b"\xff\xd8\xff\xe0" + b"\x00" * 300) == CORRUPT_IMAGE  # a JPEG marker, then nothing sensible
    for data in (jpeg, png, gif, webp):
        for keep in (0.5, 0.97):
            assert reason(data[: int(len(data) * keep)]) == TRUNCATED_IMAGE
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    assert reason(svg) == UNSUPPORTED_IMAGE
    assert reason(b"<svg viewBox='0 0 1 1'/>") == UNSUPPORTED_IMAGE
    assert reason(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64) == UNSUPPORTED_IMAGE
    assert reason(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n") == UNSUPPORTED_IMAGE  # known, refused


def test_truncation_is_caught_whatever_the_pillow_global(monkeypatch):
    img = photo_like(300, 200)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for fmt in ("JPEG", "PNG", "GIF", "TIFF"):
        data = encode(img, fmt)
        assert decode_image(data).size == (300, 200), fmt  # complete files still decode
        assert reason(data[: len(data) * 3 // 4]) == TRUNCATED_IMAGE, fmt
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # read, never changed


def test_decompression_bombs_are_refused_before_decoding():
    limit = Image.MAX_IMAGE_PIXELS
    assert reason(png_with_header(100_000, 100_000)) == DECOMPRESSION_BOMB  # Pillow's own error range
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow only warns here; we refuse
        assert reason(png_with_header(10_000, 10_000), max_pixels=10**9) == DECOMPRESSION_BOMB
    # garbage pixel data: a decode would fail as corrupt, so the bomb reason proves the header check came first
    assert reason(png_with_header(2000, 1000, payload=b"junk"), max_pixels=1_000_000) == DECOMPRESSION_BOMB
    assert reason(encode(Image.new("RGB", (2000, 501)), "JPEG"), max_pixels=1_000_000) == DECOMPRESSION_BOMB
    assert decode_image(encode(Image.new("RGB", (2000, 500)), "JPEG"), max_pixels=1_000_000).size == (2000, 500)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_draft_decoding_and_fast_transform():
    big = photo_like(1600, 1200, seed=3)
    data = encode(big, "JPEG", quality=92)
    assert decode_image(data, draft_size=336).size == (800, 600)  # 1/2 scale keeps both edges >= 336
    assert decode_image(data, draft_size=700).size == (1600, 1200)  # not 2x larger: full decode
    assert decode_image(encode(big, "PNG"), draft_size=336).size == (1600, 1200)  # JPEG only
    processor = image_processor_for_vision_config(CLIPVisionConfig(image_size=336))
    exact, fast = ImageTransform.from_processor(processor), ImageTransform.from_processor(processor, fast=True)
    assert exact.draft_size is None and fast.draft_size == 336
    expected = processor(decode_image(data), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(exact.decode(data), expected)
    deviation = (fast.decode(data) - expected).abs()
    assert deviation.shape == expected.shape and 0 < deviation.mean().item() < 0.05, deviation.mean().item()
    # without draft decoding, fast mode only resamples the cropped part: a couple of uint8 levels at most
    level = 1 / 255 / min(processor.image_std)
    for width, height in [(640, 480), (300, 900), (3, 2)]:
        img = photo_like(width, height, seed=width)
        assert (fast(img) - exact(img)).abs().max().item() <= 3 * level + 1e-6, (width, height)


def test_processor_for_vision_configs(tmp_path):
    clip = saved_processor(tmp_path / "clip", CLIPVisionConfig(image_size=30))
    assert (clip.size.shortest_edge, clip.crop_size.height, clip.crop_size.width) == (30, 30, 30)
    assert clip.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    siglip = saved_processor(tmp_path / "siglip", SiglipVisionConfig(image_size=28))
    assert (siglip.size.height, siglip.size.width, siglip.do_center_crop) == (28, 28, None)
    assert siglip.image_mean == pytest.approx((0.5, 0.5, 0.5)) and siglip.image_std == pytest.approx((0.5,) * 3)
    full = image_processor_for_vision_config(CLIPConfig(vision_config={"image_size": 40}))
    assert full.crop_size.height == 40
    with pytest.raises(ValueError, match="llama"):
        image_processor_for_vision_config(LlamaConfig())


def test_refuses_processors_it_cannot_reproduce():
    class Custom(CLIPImageProcessorPil):
        def resize(self, image, size, **kwargs):
            return image

    with pytest.raises(ValueError, match="overrides resize"):
        ImageTransform.from_processor(Custom())
    with pytest.raises(TypeError):
        ImageTransform.from_processor(object())


def test_transform_survives_pickling_for_dataloader_workers():
    transform = ImageTransform.from_processor(image_processor_for_vision_config(SiglipVisionConfig(image_size=32)))
    clone = pickle.loads(pickle.dumps(transform))
    img = photo_like(50, 40)
    assert torch.equal(clone(img), transform(img))
