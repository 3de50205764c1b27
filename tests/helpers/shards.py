"""Small input files for the shard-building tests: real images of each kind, and each kind of broken input."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> bytes:
    """A noisy image (so truncation really cuts pixel data) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG file that declares a huge image: only its header is valid, as in a real decompression bomb."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n'


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def bad_images() -> dict[str, bytes]:
    """File name -> bytes for each kind of bad image, named after the reason it must be skipped for."""
    jpeg = image_bytes("JPEG", (64, 64))
    png = image_bytes("PNG", (64, 64))
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "corrupt.jpg": b"this is not an image at all" * 10,
        "empty.jpg": b"",
        "vector.svg": SVG,
        "bomb.png": bomb_png(),
    }


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_members(directory: Path) -> dict[str, bytes]:
    """Every member of every shard in a directory, by member name."""
    out: dict[str, bytes] = {}
    for shard in sorted(directory.glob("shard-*.tar")):
        out.update(tar_members(shard))
    return out


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A plain tar of (key, {ext: bytes}) samples, for hand-made good and bad shards."""
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path
