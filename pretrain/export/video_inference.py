"""Answers about a clip with an exported LlavaNextVideo model: `pretrain generate HF_DIR --video clip.mp4`.

The clip goes the way training took it: the frames the loader samples (the export's `num_frames` / `fps`, written
from data.video_frames / data.video_fps, so the budget is the same at training and at inference), decoded by
seeking, made pixels by FrameTransform, and `<video>` expanded to frames x pooled tokens per frame. Those steps
equal transformers' LlavaNextVideoProcessor's (tests/export/test_video_parity.py), which needs torchvision; this
path does not, so it works beside the project's CPU torch. The prompt goes through the export's chat template as a
typed `{"type": "video"}` item, rendered as training rendered the `<video>` turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, LlavaNextImageProcessorPil
from transformers.utils import VIDEO_PROCESSOR_NAME

from pretrain.data.anyres import tile_processor
from pretrain.data.image_formats import DEFAULT_MAX_PIXELS
from pretrain.data.video import FrameTransform, clip_frames
from pretrain.model.video import tokens_per_frame
from pretrain.tokens import VIDEO_TOKEN

DEFAULT_FRAMES = 8  # an export that does not say how many frames it was trained with


class ClipAnswerer:
    def __init__(self, hf_dir: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        hf_dir = Path(hf_dir)
        if not (hf_dir / VIDEO_PROCESSOR_NAME).is_file():
            raise ValueError(f"{hf_dir} is not a video model export (no {VIDEO_PROCESSOR_NAME}): train with "
                             "data.video_frames > 0 and model.image_tiling=anyres")
        settings = json.loads((hf_dir / VIDEO_PROCESSOR_NAME).read_text())
        self.frames = int(settings.get("num_frames") or DEFAULT_FRAMES)
        self.fps = settings.get("fps")
        self.tok = AutoTokenizer.from_pretrained(hf_dir)
        self.transform = FrameTransform(tile_processor(LlavaNextImageProcessorPil.from_pretrained(hf_dir)))
        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype).to(self.device).eval()
        self.per_frame = tokens_per_frame(self.model.config.vision_config)

    def inputs(self, clip: bytes, prompt: str) -> dict[str, torch.Tensor]:
        frames, _, _ = clip_frames(clip, self.frames, self.fps, DEFAULT_MAX_PIXELS)
        pixels = torch.stack([self.transform(f) for f in frames])
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        video_id = self.tok.convert_tokens_to_ids(VIDEO_TOKEN)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        ids = [x for t in ids for x in ([t] * (len(frames) * self.per_frame) if t == video_id else [t])]
        return {"input_ids": torch.tensor([ids], device=self.device),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                "pixel_values_videos": pixels[None].to(self.device, self.model.dtype)}

    @torch.no_grad()
    def __call__(self, clip: bytes, prompt: str, max_new_tokens: int = 64) -> str:
        inputs = self.inputs(clip, prompt)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
