"""Clips: probing, frame sampling (constant and variable frame rate) and the seeking decode, which must give the
frames a full decode gives at the same numbers; bad clips raise SampleError with their reason."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from helpers.clips import frame_number, make_clip

from pretrain.data import errors
from pretrain.data.errors import SampleError
from pretrain.data.video import (
    clip_frames,
    decode_all_then_sample,
    decode_frames,
    probe,
    sample_indices,
    sampled_frames,
)

CAP = 10**6


@pytest.mark.parametrize("container,codec", [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4"),
                                             ("matroska", "libx264")])
def test_seeking_decode_equals_full_decode(container, codec):
    data = make_clip(frames=40, fps=10, gop=8, container=container, codec=codec)
    info = probe(data, CAP)
    assert (info.frames, info.width, info.height) == (40, 64, 48)
    assert info.duration == pytest.approx(4.0, abs=0.01) and info.fps == pytest.approx(10, abs=0.05)
    for wanted in ([0, 5, 10, 15, 20, 25, 30, 35], [3, 4, 39], [17], [39, 2, 2]):
        seeked = decode_frames(data, wanted, CAP)
        assert all(np.array_equal(a, b) for a, b in zip(seeked, decode_all_then_sample(data, wanted)))
        if codec == "libx264":  # near-lossless: each frame says its number
            assert [frame_number(f) for f in seeked] == wanted


def test_sampling_uniform_fewer_for_short_clips_and_by_fps():
    assert sample_indices(24, 2.0, 5) == [0, 4, 9, 14, 19]  # transformers' arange(0, n, n / k)
    assert sample_indices(3, 0.1, 8) == [0, 1, 2]
    assert sample_indices(100, 10.0, 8, fps=0.5) == [0, 20, 40, 60, 80]  # 10 s at 0.5 fps: 5 frames
    assert sample_indices(100, 10.0, 8, fps=30) == sample_indices(100, 10.0, 8)  # capped by max_frames
    assert sample_indices(2, 0.05, 8, fps=1) == [0]  # shorter than one sampling period: one frame
    frames, numbers, info = clip_frames(make_clip(frames=1), 8, None, CAP)
    assert len(frames) == 1 and numbers == [0] and info.frames == 1 and info.duration > 0


def test_variable_frame_rate_is_sampled_by_time():
    # 10 frames in the first 0.5 s, then one frame per second: uniform frame numbers would take the burst
    times = [0.05 * i for i in range(10)] + [1.0, 2.0, 3.0, 4.0, 5.0]
    data = make_clip(frames=len(times), timestamps=times)
    frames, numbers, info = clip_frames(data, 6, None, CAP)
    assert numbers == [0, 9, 10, 11, 12, 13]  # one per 0.9 s; by number: [0, 2, 5, 7, 10, 12]
    assert sample_indices(15, info.duration, 6) == [0, 2, 5, 7, 10, 12]
    assert [frame_number(f) for f in frames] == numbers
    # a constant-rate clip whose timestamps the muxer rounded takes transformers' numbers
    for n in (5, 7, 24, 100):
        data = make_clip(frames=n, fps=30)
        _, numbers, info = clip_frames(data, 8, None, CAP)
        assert numbers == sample_indices(n, info.duration, 8)
    assert sampled_frames([0, 10, 20, 30], 0.01, 2, None) == [0, 2]


def _corrupt_packet(data: bytes, n: int) -> bytes:
    with av.open(io.BytesIO(data)) as c:
        pos, size = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size][n]
    out = bytearray(data)
    out[pos + 4 : pos + size] = b"\xff" * (size - 4)
    return bytes(out)


def test_bad_clips_have_reasons():
    good = make_clip(frames=24, gop=24)
    cases = {
        errors.CORRUPT_VIDEO: [good[: len(good) // 2], b"", b"not a video at all" * 10],
        errors.NO_VIDEO_STREAM: [make_clip(frames=0, audio=True)],
        errors.NO_VIDEO_FRAMES: [make_clip(frames=0, container="avi", codec="mpeg4")],  # a stream, no frame
        errors.VIDEO_TOO_LARGE: [make_clip(frames=2, width=1280, height=960)],
    }
    for reason, clips in cases.items():
        for data in clips:
            with pytest.raises(SampleError) as e:
                probe(data, CAP)
            assert e.value.reason == reason
    broken = _corrupt_packet(good, 12)
    probe(broken, CAP)  # the header and the first frame are fine
    decode_frames(broken, [0, 5, 11], CAP)  # frames before the broken one decode
    for check in (lambda: clip_frames(broken, 8, None, CAP), lambda: probe(broken, CAP, full_decode=True)):
        with pytest.raises(SampleError) as e:
            check()
        assert e.value.reason == errors.CORRUPT_VIDEO
