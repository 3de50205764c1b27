"""Video clips: probe (build time), frame sampling and sampled-frame decoding (run time).

The binding is PyAV (`av`): its wheels bundle FFmpeg, so no system library or torchvision is needed (torchvision
cannot load beside the CPU torch the project pins, and torchcodec needs FFmpeg's shared libraries installed apart),
it reads from bytes in memory, and it exposes what seeking needs: packets with their timestamps and keyframe flags
(demuxed without decoding) and `container.seek` to the keyframe before a timestamp. transformers' own `pyav` video
backend uses the same library, so frame numbering is the same as the processor's.

A clip's frames are numbered in presentation order (sorted packet timestamps), as a full decode yields them. The
sampled frames of a clip are decoded by seeking to the keyframe before each one and decoding forward to it; a
sampled frame reached from the previous one without passing a keyframe is decoded on from there instead (no seek
back). So a sampled clip costs about one group of pictures per sampled frame, not the whole clip. Variable frame
rate clips: sampling is by frame number (as transformers' processors sample) or, with `fps`, by presentation time,
each sampled time taking the frame shown then.

Bad clips raise SampleError: `corrupt_video` (does not open, or a sampled frame does not decode), `no_video_stream`
(audio only), `no_video_frames`, `video_too_large` (more pixels per frame than the cap).
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from pretrain.data import errors
from pretrain.data.errors import SampleError
from pretrain.data.image import ImageTransform
from pretrain.data.image_processors import TORCHVISION_BACKEND, spec_from_processor

# Containers a shard sample's clip may come in (the original bytes, never re-encoded).
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reads from a clip without decoding it: kept in the shard sample's KEY.json as `video`."""

    duration: float  # seconds, first to last frame plus one frame's display time
    frames: int
    fps: float  # frames / duration (the average rate of a variable frame rate clip)
    width: int
    height: int

    def to_json(self) -> dict:
        return {"duration": round(self.duration, 6), "frames": self.frames, "fps": round(self.fps, 6),
                "width": self.width, "height": self.height}


@dataclass
class _Index:
    """A clip's frames from its packets: presentation timestamps (sorted) and which of them are keyframes."""

    pts: list[int]
    keyframes: list[int]  # sorted pts of keyframes
    time_base: float
    width: int
    height: int
    rate: float | None  # the stream's stated frame rate: a one-frame clip's only duration


def _open(data: bytes):
    import av

    if not data:
        raise SampleError(errors.CORRUPT_VIDEO, "empty video bytes")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise SampleError(errors.CORRUPT_VIDEO, f"{type(err).__name__}: {err}") from None
    if not container.streams.video:
        container.close()
        raise SampleError(errors.NO_VIDEO_STREAM)
    return container


def _index(container, max_pixels: int) -> _Index:
    import av

    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        raise SampleError(errors.VIDEO_TOO_LARGE, f"{width}x{height} = {width * height} pixels > {max_pixels}")
    pts, keys = [], []
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.error.EOFError:
        pass  # a stream that ends inside its header: the packets read so far are the clip
    except (av.error.FFmpegError, ValueError) as err:
        raise SampleError(errors.CORRUPT_VIDEO, f"{type(err).__name__}: {err}") from None
    if not pts:
        raise SampleError(errors.NO_VIDEO_FRAMES)
    if width <= 0 or height <= 0:
        raise SampleError(errors.CORRUPT_VIDEO, f"frame size {width}x{height}")
    rate = stream.average_rate or stream.guessed_rate
    return _Index(sorted(pts), sorted(keys), float(stream.time_base), width, height, float(rate) if rate else None)


def _info(index: _Index) -> VideoInfo:
    n = len(index.pts)
    span = (index.pts[-1] - index.pts[0]) * index.time_base
    step = span / (n - 1) if n > 1 else 1.0 / index.rate if index.rate else 0.0
    duration = span + step
    return VideoInfo(duration, n, n / duration if duration > 0 else 0.0, index.width, index.height)


def probe(data: bytes, max_pixels: int, full_decode: bool = False) -> VideoInfo:
    """Duration, frame count, rate and size of a clip, from its packets (no frame decoded but the first, which
    proves the stream decodes; with `full_decode`, every frame, which also finds a corrupt one further on).
    Raises SampleError for a bad clip."""
    container = _open(data)
    try:
        index = _index(container, max_pixels)
        _decode_at(container, index, index.pts if full_decode else [index.pts[0]])
        return _info(index)
    finally:
        container.close()


def sample_indices(frames: int, duration: float, max_frames: int, fps: float | None = None) -> list[int]:
    """Which frames of a clip to take: `max_frames` spread uniformly (fewer when the clip has fewer), or with `fps`
    one every 1/fps seconds, capped at `max_frames`. Uniform spreading is transformers' own (`arange(0, n, n / k)`
    truncated), so the same count gives the processor's frames."""
    count = min(max_frames, frames)
    if fps is not None and duration > 0:
        count = max(1, min(count, math.floor(duration * fps)))
    return np.arange(0, frames, frames / count).astype(np.int32).tolist()[:count]


def decode_frames(data: bytes, indices: list[int], max_pixels: int) -> list[np.ndarray]:
    """The clip's frames at `indices` (presentation order numbers) as (H, W, 3) uint8 RGB arrays, decoded by
    seeking (see the module docstring). A frame that does not decode raises SampleError(corrupt_video)."""
    container = _open(data)
    try:
        index = _index(container, max_pixels)
        if max(indices) >= len(index.pts) or min(indices) < 0:
            raise SampleError(errors.CORRUPT_VIDEO, f"frame {max(indices)} of {len(index.pts)}")
        return _decode_at(container, index, [index.pts[i] for i in indices])
    finally:
        container.close()


def sampled_frames(index_pts: list[int], time_base: float, max_frames: int, fps: float | None) -> list[int]:
    """Frame numbers of a clip to take. A constant frame rate clip (every timestamp within a tick and 10% of a frame
    of evenly spaced ones, as a muxer's rounding leaves them): `sample_indices`, transformers' numbers. A variable
    frame rate clip: the same count spread evenly over its time (first frame to the end of the last), each time
    taking the frame on screen then, so that bursts of frames do not take the samples."""
    n = len(index_pts)
    span = index_pts[-1] - index_pts[0]
    step = span / (n - 1) if n > 1 else 1.0
    wanted = sample_indices(n, (span + step) * time_base if n > 1 else 0.0, max_frames, fps)
    tolerance = 1 + 0.1 * step
    if all(abs(p - index_pts[0] - i * step) <= tolerance for i, p in enumerate(index_pts)):
        return wanted
    count = len(wanted)
    return [max(0, bisect.bisect_right(index_pts, index_pts[0] + k * (span + step) / count) - 1)
            for k in range(count)]


def clip_frames(data: bytes, max_frames: int, fps: float | None, max_pixels: int
                ) -> tuple[list[np.ndarray], list[int], VideoInfo]:
    """The sampled frames of a clip (`sampled_frames`), their numbers and the clip's probed info, one open of the
    bytes."""
    container = _open(data)
    try:
        index = _index(container, max_pixels)
        wanted = sampled_frames(index.pts, index.time_base, max_frames, fps)
        return _decode_at(container, index, [index.pts[i] for i in wanted]), wanted, _info(index)
    finally:
        container.close()


def _decode_at(container, index: _Index, targets: list[int]) -> list[np.ndarray]:
    """Frames whose pts are `targets` (pts of existing frames, any order, repeats allowed), in that order."""
    import av

    stream = container.streams.video[0]
    found: dict[int, np.ndarray] = {}
    position: int | None = None  # pts of the last frame decoded; None: nothing decoded since the last seek
    frames = None
    try:
        for target in sorted(set(targets)):
            key = index.keyframes[max(0, bisect.bisect_right(index.keyframes, target) - 1)] if index.keyframes \
                else index.pts[0]
            if position is None or position >= target or key > position:
                container.seek(target, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                position = None
            for frame in frames:
                if frame.pts is None:
                    continue
                position = frame.pts
                if frame.pts >= target:
                    if frame.pts != target:
                        raise SampleError(errors.CORRUPT_VIDEO, f"frame at pts {target} did not decode")
                    found[target] = frame.to_ndarray(format="rgb24")
                    break
            else:
                raise SampleError(errors.CORRUPT_VIDEO, f"the stream ended before pts {target}")
    except (av.error.FFmpegError, ValueError) as err:
        raise SampleError(errors.CORRUPT_VIDEO, f"{type(err).__name__}: {err}") from None
    return [found[t] for t in targets]


def decode_all_then_sample(data: bytes, indices: list[int]) -> list[np.ndarray]:
    """The common practice the seeking decode is measured against (and checked equal to): decode every frame in
    order, keep those at `indices` (transformers' `pyav` backend reads clips so)."""
    container = _open(data)
    try:
        wanted, out = set(indices), {}
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
        return [out[i] for i in indices]
    finally:
        container.close()


def video_lookup_table(processor: Any) -> np.ndarray:
    """transformers' video processors' rescale + normalise of every uint8 value, per channel (3, 256): their
    TorchvisionBackend fuses the two into float32 `(x - mean / f) / (std / f)` (`_fuse_mean_std_and_rescale_factor`,
    then torchvision's normalize: sub, then div), redone here with the same float32 operations since torchvision
    itself does not load beside the CPU torch the project pins."""
    x = torch.arange(256, dtype=torch.float32).expand(3, 256).clone()
    rescale, normalize = bool(processor.do_rescale), bool(processor.do_normalize)
    mean = torch.tensor(list(processor.image_mean))
    std = torch.tensor(list(processor.image_std))
    if rescale and normalize:
        mean, std = mean * (1.0 / processor.rescale_factor), std * (1.0 / processor.rescale_factor)
    if normalize:
        x = x.sub_(mean[:, None]).div_(std[:, None])
    elif rescale:
        x = x * processor.rescale_factor
    return x.numpy().astype(np.float32)


class FrameTransform:
    """A decoded frame (H, W, 3) uint8 -> (3, S, S) float32, as transformers' LlavaNextVideoVideoProcessor with the
    tower processor's settings makes it: its TorchvisionBackend resize (antialiased interpolate on uint8) and centre
    crop, then the fused rescale / normalise (`video_lookup_table`)."""

    def __init__(self, tower_processor: Any) -> None:
        spec = spec_from_processor(tower_processor)
        self.transform = ImageTransform(replace(spec, backend=TORCHVISION_BACKEND,
                                                lut=video_lookup_table(tower_processor)))

    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        return self.transform(Image.fromarray(frame))
