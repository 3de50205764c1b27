"""Sampled-frame decoding, frames per CPU-second: ours (pretrain.data.video.clip_frames: seek to the keyframe before
each sampled frame, decode forward to it) against the common practice (decode every frame in order and keep the
sampled ones, as transformers' `pyav` reader does: pretrain.data.video.decode_all_then_sample), on clips of 10 s,
60 s and 5 min that this script encodes with PyAV (H.264, 640x360, 30 fps, a keyframe every 250 frames: libx264's
default, as most downloaded clips have). CPU time of this process (time.process_time), not wall clock: the machine
is shared. Both paths take the same frames (checked equal).

    .venv/bin/python tools/bench_video_decode.py [--frames 8] [--rounds 3] [--width 640 --height 360]
"""

from __future__ import annotations

import argparse
import io
import time
from fractions import Fraction
from functools import partial

import av
import numpy as np

from pretrain.data.video import clip_frames, decode_all_then_sample


def encode_clip(seconds: int, fps: int, width: int, height: int, gop: int) -> bytes:
    """A moving gradient with noise (so the codec has real work), H.264 in mp4."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    noise = rng.integers(0, 24, size=(8, height, width, 3), dtype=np.uint8)
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast", "crf": "23"}
        stream.time_base = Fraction(1, fps)
        for i in range(seconds * fps):
            img = ((base + 3 * i) % 256).astype(np.uint8) + noise[i % 8]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def cpu_seconds(fn) -> tuple[float, object]:
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=8, help="frames sampled per clip (data.video_frames)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--gop", type=int, default=250)
    args = p.parse_args()
    print("| clip | frames in clip | MB | ours: sampled frames per CPU-s | decode all, then sample | x |")
    print("|---|---|---|---|---|---|")
    for seconds in (10, 60, 300):
        data = encode_clip(seconds, args.fps, args.width, args.height, args.gop)
        ours, theirs = [], []
        for _ in range(args.rounds):
            t_ours, (frames, indices, info) = cpu_seconds(partial(clip_frames, data, args.frames, None, 10**9))
            t_all, full = cpu_seconds(partial(decode_all_then_sample, data, indices))
            assert all(np.array_equal(a, b) for a, b in zip(frames, full))
            ours.append(len(frames) / t_ours)
            theirs.append(len(frames) / t_all)
        a, b = float(np.median(ours)), float(np.median(theirs))
        print(f"| {seconds} s | {info.frames} | {len(data) / 1e6:.1f} | {a:.1f} | {b:.2f} | {a / b:.0f}x |",
              flush=True)


if __name__ == "__main__":
    main()
