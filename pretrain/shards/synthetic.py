"""The grounded synthetic shapes data set: the demo's data and the proof that the image path learns.

Each image shows 1-3 identical shapes (one shape, one colour) placed together in one region of the image. The caption
and the question/answer pairs are a function of those four attributes only, so a model that ignores the image can do
no better than chance on them, and `parse_caption` scores what a trained model generates.

Layouts are fixed per (position, count) with a little seeded jitter: strips along the left/right/top/bottom edge and a
cluster around the middle. Shapes are about a fifth of the image wide, so they stay visible when the demo's vision
tower resizes 64 px images to 32 px (four 8 px patches a side).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pretrain.shards.writer import ShardWriter, clear_shard_dir, write_manifest

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = ("one", "two", "three")  # COUNT_WORDS[n - 1] names n
QUESTIONS = {
    "color": "what color is the shape?",
    "shape": "what shape is it?",
    "count": "how many shapes are there?",
    "position": "where are the shapes?",
}

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Shape centres as fractions of the image side, (x, y), per position and count. Edge strips run along a third of the
# image; the centre cluster stays inside the middle so it never reads as an edge.
_ALONG = {1: (0.5,), 2: (0.3, 0.7), 3: (0.17, 0.5, 0.83)}
_EDGE = 1 / 6
_CENTER = {1: ((0.5, 0.5),), 2: ((0.38, 0.5), (0.62, 0.5)), 3: ((0.5, 0.37), (0.37, 0.61), (0.63, 0.61))}
_SPLIT_STREAM = {"train": 0, "val": 1}  # separate RNG streams per split
_SHAPE_FRACTION = 0.2  # shape box side / image side (jittered +-10% per image)
_JITTER = 0.025  # per-shape centre jitter, fraction of the image side


def caption_for(attrs: dict[str, Any]) -> str:
    """The caption of an image with these attributes, e.g. 'two red circles on the left.'"""
    count = int(attrs["count"])
    noun = attrs["shape"] + ("s" if count > 1 else "")
    return f"{COUNT_WORDS[count - 1]} {attrs['color']} {noun} {_POSITION_PHRASE[attrs['position']]}."


def answer_for(attribute: str, attrs: dict[str, Any]) -> str:
    """The answer to QUESTIONS[attribute] for an image with these attributes."""
    if attribute == "count":
        return COUNT_WORDS[int(attrs["count"]) - 1]
    return str(attrs[attribute])


def qa_for(attrs: dict[str, Any]) -> list[dict[str, str]]:
    """One question/answer pair per attribute, in a fixed order."""
    return [{"question": QUESTIONS[a], "answer": answer_for(a, attrs)} for a in ("color", "shape", "count", "position")]


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> dict[str, Any]:
    """The attributes a (generated) caption names: a subset of shape, color, count (int) and position.

    The first word of each vocabulary that appears wins; an attribute with no word in the text is left out, so a
    scorer can count it as wrong. `parse_caption(caption_for(a)) == a` for every attribute combination.
    """
    found: dict[str, Any] = {}
    words = _WORD.findall(text.lower())
    for word in words:
        singular = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if "shape" not in found and singular in SHAPES:
            found["shape"] = singular
        elif "color" not in found and word in COLORS:
            found["color"] = word
        elif "count" not in found and word in COUNT_WORDS:
            found["count"] = COUNT_WORDS.index(word) + 1
        elif "position" not in found and word in POSITIONS:
            found["position"] = word
    return found


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Draw the four attributes uniformly and independently."""
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": COLORS[rng.integers(len(COLORS))],
        "count": int(rng.integers(1, len(COUNT_WORDS) + 1)),
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }


def shape_centers(position: str, count: int) -> tuple[tuple[float, float], ...]:
    """Nominal shape centres (x, y) as fractions of the image side."""
    if position == "center":
        return _CENTER[count]
    along = _ALONG[count]
    if position in ("left", "right"):
        x = _EDGE if position == "left" else 1 - _EDGE
        return tuple((x, a) for a in along)
    y = _EDGE if position == "top" else 1 - _EDGE
    return tuple((a, y) for a in along)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill: tuple) -> None:
    h = side / 2
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "square":
        s = h * 0.88  # a slightly smaller square so its area is close to the circle's
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(((cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render(attrs: dict[str, Any], rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw an RGB image of `attrs` on a light, slightly noisy background."""
    background = tuple(int(v) for v in rng.integers(225, 250, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    side = image_size * _SHAPE_FRACTION * float(rng.uniform(0.9, 1.1))
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in RGB[attrs["color"]])
    for fx, fy in shape_centers(attrs["position"], int(attrs["count"])):
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
        _draw_shape(draw, attrs["shape"], (fx + jx) * image_size, (fy + jy) * image_size, side, fill)
    # Mild sensor-like noise so the background is not a single flat value the model could key on.
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(image_size, image_size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with fixed settings and no metadata, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def make_sample(split: str, index: int, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """Sample `index` of `split` as a WebDataset sample dict. Each sample has its own RNG stream derived from
    (seed, split, index), so any sample can be regenerated alone and val does not depend on the train size."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    attrs = sample_attributes(rng)
    caption = caption_for(attrs)
    meta = {"caption": caption, "qa": qa_for(attrs), "attributes": attrs, "source": "synthetic"}
    return {
        "__key__": f"{split}-{index:08d}",
        "png": encode_png(render(attrs, rng, image_size)),
        "txt": caption,
        "json": json.dumps(meta, sort_keys=True),
    }


def write_split(
    out_dir: str | Path, split: str, n: int, seed: int = 0, samples_per_shard: int = 1000, image_size: int = 64
) -> dict[str, Any]:
    """Write one split's shards and manifest into `out_dir`; returns the manifest."""
    clear_shard_dir(out_dir, overwrite=True)  # generated data: a re-run simply replaces the previous one
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer:
        for i in range(n):
            writer.write(make_sample(split, i, seed, image_size))
    extra = {"source": "synthetic", "split": split, "seed": seed, "image_size": image_size}
    return write_manifest(out_dir, writer.shards, extra=extra)


def write_synthetic(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    samples_per_shard: int = 1000,
    image_size: int = 64,
) -> dict[str, Any]:
    """Write `out_dir/train/` and `out_dir/val/` (shards + manifest.json). Deterministic: the same arguments give
    byte-identical files. Returns per split: `dir`, `urls` (a brace pattern over the shards, or a single path),
    `samples`, `shards`."""
    if n_train < 0 or n_val < 0:
        raise ValueError("n_train and n_val must be >= 0")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw recognisable shapes, got {image_size}")
    result: dict[str, Any] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        split_dir = Path(out_dir) / split
        manifest = write_split(split_dir, split, n, seed, samples_per_shard, image_size)
        result[split] = {
            "dir": str(split_dir),
            "urls": brace_pattern(split_dir, [s["url"] for s in manifest["shards"]]),
            "samples": manifest["num_samples"],
            "shards": manifest["num_shards"],
        }
    return result


def brace_pattern(directory: str | Path, names: list[str], prefix: str = "shard") -> str:
    """`DIR/shard-{000000..000003}.tar` for consecutively numbered shards (one name: its plain path)."""
    if len(names) <= 1:
        return str(Path(directory) / names[0]) if names else ""
    return str(Path(directory) / f"{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar")
