"""Small clips encoded here with PyAV (the library the loader decodes with): each frame's colour encodes its number,
so a decoded frame says which one it is."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from pretrain.config import Config, build_config
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES


def frame_pixels(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: a flat grey level 6 * i (mod 252) with a bright square whose position also moves with i."""
    img = np.full((height, width, 3), (6 * i) % 252, dtype=np.uint8)
    x = (4 * i) % max(1, width - 8)
    img[2:8, x : x + 6] = 255
    return img


def make_clip(frames: int = 24, fps: int = 12, width: int = 64, height: int = 48, container: str = "mp4",
              codec: str = "libx264", gop: int = 6, timestamps: list[float] | None = None,
              audio: bool = False) -> bytes:
    """A clip of `frames` frames; `timestamps` (seconds, increasing) makes a variable frame rate clip."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        if frames or not audio:
            stream = out.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {"bf": "0", "crf": "10", "preset": "ultrafast"}
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
            if not frames:
                out.start_encoding()  # the header alone: a video stream with no frame
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(frame_pixels(i, width, height), format="rgb24")
                t = timestamps[i] if timestamps else i / fps
                frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        if audio:
            a = out.add_stream("aac", rate=16000)
            samples = np.zeros((1, 1024), dtype=np.float32)
            for k in range(8):
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                af.sample_rate, af.pts = 16000, k * 1024
                for packet in a.encode(af):
                    out.mux(packet)
            for packet in a.encode():
                out.mux(packet)
    return buf.getvalue()


def frame_number(rgb: np.ndarray) -> int:
    """Which frame of `make_clip` a decoded frame is (from its grey level; lossy coding moves it a little)."""
    return int(round(float(np.median(rgb[20:, :, 0])) / 6))


def video_config(vision: str = "clip", frames: int = 4, **data) -> Config:
    """A tiny AnyRes video run's config (data.video_frames = `frames`), for in-process tests."""
    return build_config({
        "model": {"llm": dict(DECODER_SHAPES["llama"]), "vision": dict(VISION_SHAPES[vision]), "tokenizer": "unused",
                  "image_tiling": "anyres"},
        "data": {"train": [{"urls": "unused.tar"}], "max_length": 2048, "video_frames": frames, **data},
        "train": {"max_steps": 1},
    })
