"""Captions and answers from an exported model, with plain transformers (what a user of the export runs)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from pretrain.data.image import decode_image
from pretrain.data.image_formats import to_rgb
from pretrain.tokens import IMAGE_TOKEN

IMAGE = IMAGE_TOKEN  # the placeholder a prompt marks each image with
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def adapter_base(hf_dir: str | Path) -> str | None:
    """The base model directory of a PEFT adapter directory; None for a plain export."""
    config = Path(hf_dir) / "adapter_config.json"
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text())["base_model_name_or_path"]


def load_image(path: str | Path) -> Image.Image:
    """An image file as training reads a shard's image: EXIF orientation, then training's colour rules (alpha
    composited on white, CMYK / palette / LAB / 16-bit converted as `pretrain.data.image_formats.to_rgb` says)."""
    return decode_image(Path(path).read_bytes())


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto`: the GPU when there is one, in bf16 (where it supports it); else the CPU in fp32."""
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype {dtype!r}: one of auto, {', '.join(DTYPES)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dtype != "auto":
        return dev, DTYPES[dtype]
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return dev, torch.bfloat16 if bf16 else torch.float32


def user_content(n_images: int, prompt: str) -> list[dict]:
    """One user turn as typed items: the prompt's `<image>` markers say where the images go (as many as images);
    without markers the images come first, as training puts a single image."""
    pieces = prompt.split(IMAGE)
    if len(pieces) == 1:
        pieces = [""] * n_images + [prompt]
    elif len(pieces) != n_images + 1:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE} markers for {n_images} image(s)")
    content: list[dict] = []
    for i, text in enumerate(pieces):
        text = text.lstrip() if i else text  # an image item renders as its own placeholder line
        if text:
            content.append({"type": "text", "text": text})
        if i < n_images:
            content.append({"type": "image"})
    return content


def load_processor(hf_dir: str | Path):
    """The export's processor. A video model's LlavaNextVideoProcessor needs torchvision for its video half; without
    it, its image half (LlavaNextProcessor, same image processor and tokenizer) captions images just the same
    (clips: pretrain.export.video_inference)."""
    try:
        return AutoProcessor.from_pretrained(hf_dir)
    except ImportError:
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor.from_pretrained(hf_dir)


class Captioner:
    """Greedy captions (no prompt: the pretraining format `[bos] <image>` then the caption) or answers to a prompt
    (typed messages through the export's chat template, rendered as training rendered them)."""

    def __init__(self, hf_dir: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        base = adapter_base(hf_dir)  # a PEFT adapter directory (`pretrain convert --adapter`) over this export
        self.processor = load_processor(base or hf_dir)
        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(base or hf_dir, dtype=dtype)
        if base is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, hf_dir).merge_and_unload()
        self.model = self.model.to(self.device).eval()
        self.tok = self.processor.tokenizer

    def prompt_text(self, prompt: str | None, n_images: int = 1) -> str:
        if prompt is None:
            return (self.tok.bos_token or "") + IMAGE * n_images
        if self.processor.chat_template is None:
            raise ValueError("this export has no chat template to put a prompt in; without --prompt it captions")
        messages = [{"role": "user", "content": user_content(n_images, prompt)}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def inputs(self, image: Image.Image | list[Image.Image], prompt: str | None = None) -> dict[str, torch.Tensor]:
        """The export's own processor on the pictures made RGB as training makes them: the pixels training saw."""
        images = [to_rgb(im) for im in (image if isinstance(image, list) else [image])]
        out = self.processor(images=images, text=self.prompt_text(prompt, len(images)), return_tensors="pt",
                             add_special_tokens=False)
        out = out.to(self.device)
        out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        return out

    def _generate(self, images: list[Image.Image], prompt: str | None, max_new_tokens: int) -> str:
        inputs = self.inputs(images, prompt)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def __call__(self, images: list[Image.Image], prompt: str | None = None, max_new_tokens: int = 32) -> list[str]:
        """One caption / answer per image."""
        return [self._generate([image], prompt, max_new_tokens) for image in images]

    def together(self, images: list[Image.Image], prompt: str | None = None, max_new_tokens: int = 32) -> str:
        """One answer about all the images, given in one user turn."""
        return self._generate(images, prompt, max_new_tokens)
