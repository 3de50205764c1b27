"""Why a sample was skipped. One exception type, one short reason string per kind of bad input."""

from __future__ import annotations


class SampleError(Exception):
    """A sample that cannot be used. `reason` is a short snake_case key counted in metrics and manifests."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# The reasons the pipeline uses; converters and the loader count by these keys.
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_IMAGE = "unsupported_image_format"
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"
BAD_JSON = "bad_json"
BAD_UTF8 = "bad_utf8"
TOO_LONG = "too_long"
BAD_CONVERSATION = "bad_conversation"
TRUNCATED_TAR = "truncated_tar"
# A shard that cannot be read (any OSError: a vanished file, EIO, ESTALE, a permission taken away, a stream that
# stalled or failed past its retries): its samples are counted lost, by its manifest's count (pretrain.data.stream).
UNREADABLE_SHARD = "unreadable_shard"
BAD_ROW = "bad_row"  # a CSV row with the wrong number of columns (converters)
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # <image> placeholders != images of the sample
TOO_MANY_IMAGES = "too_many_images"  # a sample whose own tiles pass data.max_images_per_batch (loader)
TOO_MANY_TILES = "too_many_image_tiles"  # a sample's images need more tiles than model.max_image_tiles
CORRUPT_VIDEO = "corrupt_video"  # a clip that does not open, or a frame of it that does not decode
NO_VIDEO_STREAM = "no_video_stream"  # audio only, or no stream at all
NO_VIDEO_FRAMES = "no_video_frames"
VIDEO_TOO_LARGE = "video_too_large"  # frames of more pixels than data.max_image_pixels
VIDEO_OFF = "video_off"  # a video sample in a run that takes none (data.video_frames 0)
MISSING_VIDEO = "missing_video"  # a <video> placeholder without a clip, or a clip without one
UNSUPPORTED_VIDEO = "unsupported_video_format"  # a container outside data.video.VIDEO_EXTENSIONS

# Every rank reduces counters over this fixed list (unknown reasons count as "other").
REASONS = (MISSING_IMAGE, CORRUPT_IMAGE, TRUNCATED_IMAGE, DECOMPRESSION_BOMB, UNSUPPORTED_IMAGE, MISSING_TEXT,
           EMPTY_TEXT, BAD_JSON, BAD_UTF8, TOO_LONG, BAD_CONVERSATION, TRUNCATED_TAR, BAD_ROW, IMAGE_COUNT_MISMATCH,
           TOO_MANY_IMAGES, TOO_MANY_TILES, UNREADABLE_SHARD, CORRUPT_VIDEO, NO_VIDEO_STREAM, NO_VIDEO_FRAMES,
           VIDEO_TOO_LARGE, VIDEO_OFF, MISSING_VIDEO, UNSUPPORTED_VIDEO, "other")
