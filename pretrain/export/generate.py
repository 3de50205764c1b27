"""Captions and answers from an exported model, with plain transformers (what a user of the export runs)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from pretrain.data.image import decode_image, to_rgb

IMAGE = "<image>"


def load_image(path: str | Path) -> Image.Image:
    """An image file as training reads a shard's image: EXIF orientation, then training's colour rules (alpha
    composited on white, CMYK / palette / LAB / 16-bit converted as `pretrain.data.image.to_rgb` says)."""
    return decode_image(Path(path).read_bytes())


class Captioner:
    """Greedy captions (no prompt: the pretraining format `[bos] <image>` then the caption) or answers to a prompt
    (rendered with the exported chat template, the image first in the user turn as in training)."""

    def __init__(self, hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.processor = AutoProcessor.from_pretrained(hf_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype).eval()
        self.tok = self.processor.tokenizer

    def prompt_text(self, prompt: str | None) -> str:
        if prompt is None:
            return (self.tok.bos_token or "") + IMAGE
        content = prompt if IMAGE in prompt else IMAGE + "\n" + prompt
        messages = [{"role": "user", "content": content}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def inputs(self, image: Image.Image, prompt: str | None = None) -> dict[str, torch.Tensor]:
        """The export's own processor on the picture made RGB as training makes it: the pixels training saw."""
        return self.processor(images=to_rgb(image), text=self.prompt_text(prompt), return_tensors="pt",
                              add_special_tokens=False)

    def __call__(self, images: list[Image.Image], prompt: str | None = None, max_new_tokens: int = 32) -> list[str]:
        out = []
        for image in images:
            inputs = self.inputs(image, prompt)
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            out.append(self.tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out
