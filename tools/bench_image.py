"""Micro-benchmark of the image stage: JPEG bytes -> CLIP pixel values, images per second on one core.

Compares, in images per CPU-second (= per core), (a) our default path (`ImageTransform.decode`, equal to the
processor), (b) our fast path (Pillow draft decoding of large JPEGs, resize of the cropped part only) and (c) the
common practice: `Image.open(...).convert("RGB")` then the transformers image processor called per image. JPEGs of
320p/480p/720p/1080p (16:9, photo-like content) are generated in a temp dir.

    .venv/bin/python tools/bench_image.py [--size 336] [--seconds 2] [--images 8]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig

from pretrain.data.image import ImageTransform, image_processor_for_vision_config
from pretrain.shards.synthetic import photo_like

RESOLUTIONS = {"320p": (568, 320), "480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}


def write_jpegs(folder: Path, count: int) -> dict[str, list[bytes]]:
    out = {}
    for name, (width, height) in RESOLUTIONS.items():
        blobs = []
        for i in range(count):
            path = folder / f"{name}_{i}.jpg"
            photo_like(width, height, seed=i).save(path, "JPEG", quality=90)
            blobs.append(path.read_bytes())
        out[name] = blobs
    return out


def cpu_seconds_per_image(fn: Callable[[bytes], torch.Tensor], blobs: list[bytes], seconds: float) -> float:
    """CPU time of this process per image, cycling over `blobs` for about `seconds` of CPU.

    CPU time, not wall time: on a shared machine other processes take the core away now and then, which wall time
    would count against whichever path happened to be running.
    """
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for data in blobs:
            fn(data)
        done += len(blobs)
    return (time.process_time() - start) / done


def rates(paths: dict[str, Callable[[bytes], torch.Tensor]], blobs: list[bytes], seconds: float, rounds: int = 5):
    """Images per CPU-second of each path: the median of `rounds` interleaved rounds (noise hits all paths alike)."""
    for fn in paths.values():  # warm-up
        fn(blobs[0])
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            samples[name].append(1.0 / cpu_seconds_per_image(fn, blobs, seconds / rounds))
    return {name: float(np.median(values)) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=336, help="CLIP image size (shortest edge and crop)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per cell")
    parser.add_argument("--images", type=int, default=8, help="distinct JPEGs per resolution")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core: Pillow's decode and resize are single-threaded too

    processor = image_processor_for_vision_config(CLIPVisionConfig(image_size=args.size))
    exact = ImageTransform.from_processor(processor)
    fast = ImageTransform.from_processor(processor, fast=True)

    def common_practice(data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return processor(img, return_tensors="pt")["pixel_values"][0]

    print(f"CLIP {args.size}px, {type(processor).__name__}, torch threads 1, {args.seconds:.1f} CPU-s per cell")
    print("images per CPU-second of one core (median of 5 interleaved rounds); deviations in normalised units")
    header = "| JPEG | ours img/s | fast img/s | HF processor img/s | ours / HF | fast / HF | ours vs HF max abs |"
    header += " fast vs ours mean abs / max abs |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for name, blobs in write_jpegs(Path(tmp), args.images).items():
            measured = rates({"ours": exact.decode, "fast": fast.decode, "hf": common_practice}, blobs, args.seconds)
            ours_rate, fast_rate, hf_rate = measured["ours"], measured["fast"], measured["hf"]
            parity = max((exact.decode(b) - common_practice(b)).abs().max().item() for b in blobs)
            dev = torch.stack([(fast.decode(b) - exact.decode(b)).abs() for b in blobs])
            print(
                f"| {name} | {ours_rate:.0f} | {fast_rate:.0f} | {hf_rate:.0f} | {ours_rate / hf_rate:.2f}x "
                f"| {fast_rate / hf_rate:.2f}x | {parity:.1e} | {dev.mean().item():.4f} / {dev.max().item():.3f} |"
            )


if __name__ == "__main__":
    main()
