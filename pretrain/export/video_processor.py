"""The video half of an export's LlavaNextVideoProcessor, written as its config files.

transformers' video processors need torchvision, which does not load beside the CPU torch the project pins, so the
processor object cannot be built here; its files can. The export saves LlavaNextProcessor (image processor,
tokenizer, chat template) as for any AnyRes model, then adds `video_preprocessor_config.json` with the tower's
settings (the ones FrameTransform reproduces: resize, centre crop, rescale, normalise) and names the processor
class LlavaNextVideoProcessor with its `<video>` token. Where torchvision is installed,
`AutoProcessor.from_pretrained(export)` gives the full LlavaNextVideoProcessor (tests/export/test_video_parity.py
loads it so in the second environment and checks it against the loader).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.utils import PROCESSOR_NAME, VIDEO_PROCESSOR_NAME

from pretrain.tokens import VIDEO_TOKEN

PROCESSOR_CLASS = "LlavaNextVideoProcessor"


def video_processor_config(image_config: dict[str, Any], num_frames: int | None = None,
                           fps: float | None = None) -> dict[str, Any]:
    """LlavaNextVideoVideoProcessor's settings: the base image processor's resize / crop / rescale / normalise (each
    frame is one tower-size image), frames given already sampled (do_sample_frames off, as the class defaults);
    `num_frames` / `fps`: the run's frame budget, which `pretrain generate --video` samples clips with."""
    keys = ("size", "crop_size", "do_resize", "do_center_crop", "resample", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    out = {k: image_config[k] for k in keys if k in image_config}
    size = out.get("size") or {}
    budget = {k: v for k, v in (("num_frames", num_frames), ("fps", fps)) if v}
    return {**out, **budget, "default_to_square": "shortest_edge" not in size, "do_sample_frames": False,
            "video_processor_type": "LlavaNextVideoVideoProcessor", "processor_class": PROCESSOR_CLASS}


def add_video_processor(out: Path, config: Any, num_frames: int | None = None, fps: float | None = None) -> None:
    """Turn the LlavaNext processor saved in `out` into a LlavaNextVideoProcessor's files."""
    processor_file = out / PROCESSOR_NAME
    processor = json.loads(processor_file.read_text())
    image_config = processor.get("image_processor") or json.loads((out / "preprocessor_config.json").read_text())
    video = video_processor_config(image_config, num_frames, fps)
    processor.update(processor_class=PROCESSOR_CLASS, video_token=VIDEO_TOKEN)
    if "image_processor" in processor:  # transformers 5 keeps the sub-processors' configs in one file
        processor["video_processor"] = video
    processor_file.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    (out / VIDEO_PROCESSOR_NAME).write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
