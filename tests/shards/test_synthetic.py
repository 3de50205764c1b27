"""The synthetic shapes data set: deterministic, and its captions say what the pixels show."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.shards import synthetic as syn


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_caption_roundtrip_all_attribute_combinations() -> None:
    for shape, color, count, position in itertools.product(syn.SHAPES, syn.COLORS, (1, 2, 3), syn.POSITIONS):
        attrs = {"shape": shape, "color": color, "count": count, "position": position}
        assert syn.parse_caption(syn.caption_for(attrs)) == attrs


def test_caption_grammar_and_partial_parse() -> None:
    assert syn.caption_for({"shape": "circle", "color": "red", "count": 2, "position": "left"}) == (
        "two red circles on the left."
    )
    assert syn.caption_for({"shape": "square", "color": "blue", "count": 1, "position": "center"}) == (
        "one blue square in the center."
    )
    # A generated caption that gets some words wrong or leaves them out is scored per attribute.
    assert syn.parse_caption("Three GREEN triangles, somewhere") == {"shape": "triangle", "color": "green", "count": 3}
    assert syn.parse_caption("nothing useful") == {}


def test_write_synthetic_is_deterministic_and_splits_differ(tmp_path: Path) -> None:
    a = syn.write_synthetic(tmp_path / "a", n_train=25, n_val=7, seed=3, samples_per_shard=10)
    syn.write_synthetic(tmp_path / "b", n_train=25, n_val=7, seed=3, samples_per_shard=10)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "train/manifest.json",
        "train/shard-000000.tar",
        "train/shard-000001.tar",
        "train/shard-000002.tar",
        "val/manifest.json",
        "val/shard-000000.tar",
    ]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a["train"]["samples"] == 25 and a["train"]["shards"] == 3 and a["val"]["samples"] == 7
    assert a["train"]["urls"].endswith("train/shard-{000000..000002}.tar")
    # Another seed gives other images; val images are not copies of train images.
    syn.write_synthetic(tmp_path / "c", n_train=25, n_val=7, seed=4, samples_per_shard=10)
    assert (tmp_path / "c/train/shard-000000.tar").read_bytes() != (tmp_path / "a/train/shard-000000.tar").read_bytes()
    train_pngs = {v for k, v in _members(tmp_path / "a/train/shard-000000.tar").items() if k.endswith(".png")}
    val_pngs = {v for k, v in _members(tmp_path / "a/val/shard-000000.tar").items() if k.endswith(".png")}
    assert not train_pngs & val_pngs


def test_sample_contents_and_manifest(tmp_path: Path) -> None:
    syn.write_synthetic(tmp_path, n_train=4, n_val=0, seed=0, image_size=48)
    members = _members(tmp_path / "train/shard-000000.tar")
    assert sorted(members)[:3] == ["train-00000000.json", "train-00000000.png", "train-00000000.txt"]
    meta = json.loads(members["train-00000000.json"])
    assert meta["source"] == "synthetic"
    assert meta["caption"] == members["train-00000000.txt"].decode() == syn.caption_for(meta["attributes"])
    assert [qa["question"] for qa in meta["qa"]] == list(syn.QUESTIONS.values())
    answers = {qa["question"]: qa["answer"] for qa in meta["qa"]}
    assert answers[syn.QUESTIONS["count"]] == syn.COUNT_WORDS[meta["attributes"]["count"] - 1]
    assert answers[syn.QUESTIONS["color"]] == meta["attributes"]["color"]
    image = Image.open(io.BytesIO(members["train-00000000.png"]))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)
    manifest = json.loads((tmp_path / "train/manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["skipped"] == [] and manifest["seed"] == 0
    assert manifest["shards"][0]["bytes"] == (tmp_path / "train/shard-000000.tar").stat().st_size
    assert json.loads((tmp_path / "val/manifest.json").read_text())["num_samples"] == 0


def _color_mask(pixels: np.ndarray, color: str) -> np.ndarray:
    # Shape pixels are the named colour +-15 per channel plus +-6 noise; the background is light grey-ish.
    return np.abs(pixels.astype(int) - np.array(syn.RGB[color])).max(axis=-1) <= 25


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (small images: a plain flood fill is enough)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


_REGION_OK = {
    "left": lambda x, y: x < 1 / 3,
    "right": lambda x, y: x > 2 / 3,
    "top": lambda x, y: y < 1 / 3,
    "bottom": lambda x, y: y > 2 / 3,
    "center": lambda x, y: 1 / 4 < x < 3 / 4 and 1 / 4 < y < 3 / 4,
}


@pytest.mark.parametrize("index", range(60))
def test_pixels_agree_with_caption(index: int) -> None:
    sample = syn.make_sample("val", index, seed=11)
    attrs = syn.parse_caption(sample["txt"])
    pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    size = pixels.shape[0]
    mask = _color_mask(pixels, attrs["color"])
    # The named colour covers a visible area (about count x a fifth of the side squared) and no other colour does.
    assert mask.sum() > attrs["count"] * 0.3 * (0.2 * size) ** 2
    for other in set(syn.COLORS) - {attrs["color"]}:
        assert _color_mask(pixels, other).sum() < 0.1 * mask.sum()
    assert _components(mask) == attrs["count"]
    ys, xs = np.nonzero(mask)
    assert _REGION_OK[attrs["position"]](xs.mean() / size, ys.mean() / size)
    # Every shape pixel lies in the named half (edge strips) or the middle (center).
    half = {"left": xs < size / 2, "right": xs >= size / 2, "top": ys < size / 2, "bottom": ys >= size / 2}
    in_region = half.get(attrs["position"], (np.abs(xs - size / 2) < 0.4 * size) & (np.abs(ys - size / 2) < 0.4 * size))
    assert in_region.all()


def test_attribute_distribution_covers_vocabulary() -> None:
    seen = [syn.parse_caption(syn.make_sample("train", i)["txt"]) for i in range(300)]
    for attribute, vocab in (("shape", syn.SHAPES), ("color", syn.COLORS), ("position", syn.POSITIONS)):
        counts = {v: sum(s[attribute] == v for s in seen) for v in vocab}
        assert min(counts.values()) > 300 / len(vocab) / 2, counts
    assert {s["count"] for s in seen} == {1, 2, 3}


def test_photo_like_pictures_are_deterministic_any_size_and_compress_like_photos() -> None:
    """The one photo-like generator (benchmarks, image tests): same seed same pixels, down to 1x1, and a JPEG
    of it is far smaller than one of noise and far larger than one of a flat colour."""
    assert np.array_equal(np.asarray(syn.photo_like(97, 61, 5)), np.asarray(syn.photo_like(97, 61, 5)))
    assert not np.array_equal(np.asarray(syn.photo_like(97, 61, 5)), np.asarray(syn.photo_like(97, 61, 6)))
    for size in ((1, 1), (3, 2), (1, 9), (9, 1), (640, 480)):
        image = syn.photo_like(*size, np.random.default_rng(0))
        assert image.size == size and image.mode == "RGB"

    def jpeg_bytes(image: Image.Image) -> int:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        return len(buf.getvalue())

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    photo = jpeg_bytes(syn.photo_like(640, 480, 0))
    assert 3 * jpeg_bytes(Image.new("RGB", (640, 480), (90, 120, 200))) < photo < jpeg_bytes(noise) / 2
