"""What a Hugging Face image processor does to a picture, read off the processor so that `ImageTransform` can redo it.

transformers 5.x has two backends for every standard processor: `PilBackend` (e.g. `CLIPImageProcessorPil`,
`SiglipImageProcessorPil`; resize in Pillow on uint8, then float64 rescale -> float32, float32 normalise in numpy) and
`TorchvisionBackend` (`CLIPImageProcessor`, `SiglipImageProcessor`; antialiased `interpolate` on a uint8 tensor, then
a fused float32 `(x - mean/s) / (std/s)`). `AutoImageProcessor` picks the torchvision one when torchvision is
installed, the PIL one otherwise. Both share the same pipeline: convert to RGB -> resize -> centre crop -> rescale ->
normalise, and the CLIP/SigLIP classes only change the defaults, so a `PreprocessSpec` of those settings is all we
need. Rescale and normalise act on each uint8 value independently, so they are captured exactly as a (3, 256) lookup
table computed by the processor's own methods: whatever float arithmetic the backend does, the table holds its result.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import get_image_size_for_max_height_width

PIL_BACKEND = "pil"
TORCHVISION_BACKEND = "torchvision"

# Methods of the standard pipeline: a processor class that overrides one of them does something we do not reproduce.
_PIPELINE_METHODS = (
    "preprocess",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "process_image",
    "convert_to_rgb",
    "_preprocess",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
    "rescale_and_normalize",
)
# torchvision InterpolationMode values -> Pillow filters (a processor may hold either kind in `resample`).
_MODE_TO_PIL = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# What TorchvisionBackend hands to torch's interpolate for each Pillow filter (only those torch itself implements).
_PIL_TO_TORCH_MODE = {
    Image.Resampling.NEAREST: "nearest-exact",
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",
}


@dataclass(frozen=True)
class PreprocessSpec:
    """The settings of a standard image processor. `resize` is `(kind, params)` or None; `crop` is (height, width)."""

    backend: str
    resize: tuple[str, tuple[int, ...]] | None
    resample: int
    crop: tuple[int, int] | None
    lut: np.ndarray  # (3, 256) float32: output value of each uint8 input value, per channel

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, computed as transformers does (int() truncation included)."""
        if self.resize is None:
            return height, width
        kind, params = self.resize
        if kind == "shortest_edge":
            # transformers.image_transforms.get_resize_output_image_size with default_to_square=False
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = params[0], int(params[0] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if kind == "shortest_longest":
            return tuple(get_size_with_aspect_ratio((height, width), params[0], params[1]))
        if kind == "max_height_width":
            return tuple(get_image_size_for_max_height_width((height, width), params[0], params[1]))
        return params[0], params[1]

    def output_size(self) -> tuple[int, int] | None:
        """The fixed (height, width) of every output, or None when it depends on the input's aspect ratio."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "fixed":
            return self.resize[1][0], self.resize[1][1]
        return None

    def draft_size(self) -> int | None:
        """Smallest edge a JPEG may be DCT-downscaled to before the resize without going below what it needs."""
        if self.resize is None:
            return None
        kind, params = self.resize
        if kind == "shortest_edge":
            return params[0]
        if kind == "fixed":
            return max(params)
        return None  # the other rules bound the long edge too; keep them exact

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(left, top, right, bottom) of the centre crop in the resized image; may lie outside it (zero padding)."""
        if self.crop is None:
            return None
        crop_h, crop_w = self.crop
        top = _crop_offset(self.backend, height, crop_h)
        left = _crop_offset(self.backend, width, crop_w)
        return left, top, left + crop_w, top + crop_h


def _crop_offset(backend: str, size: int, crop: int) -> int:
    """Start of the crop along one axis; negative means padding. The backends round odd paddings differently."""
    if backend == PIL_BACKEND:
        # image_transforms.center_crop: top = (size - crop) // 2, the image pasted at ceil(pad / 2)
        return (size - crop) // 2
    if size >= crop:
        return int((size - crop) / 2.0)
    return -((crop - size) // 2)  # TorchvisionBackend.center_crop pads floor(pad / 2) on the left/top


def _pil_filter(resample: Any) -> int:
    if resample is None:
        return Image.Resampling.BILINEAR  # the backends' default
    if isinstance(resample, int):
        return Image.Resampling(int(resample))
    value = getattr(resample, "value", resample)
    if value not in _MODE_TO_PIL:
        raise ValueError(f"unsupported resample filter {resample!r}")
    return _MODE_TO_PIL[value]


def _resize_rule(processor: Any) -> tuple[str, tuple[int, ...]] | None:
    if not processor.do_resize:
        return None
    size = processor.size
    if size is None:
        raise ValueError("processor has do_resize=True but no size")
    if size.shortest_edge and size.longest_edge:
        return "shortest_longest", (int(size.shortest_edge), int(size.longest_edge))
    if size.shortest_edge:
        return "shortest_edge", (int(size.shortest_edge),)
    if size.max_height and size.max_width:
        return "max_height_width", (int(size.max_height), int(size.max_width))
    if size.height and size.width:
        return "fixed", (int(size.height), int(size.width))
    raise ValueError(f"unsupported size {size}")


def _lookup_table(processor: Any, backend: str) -> np.ndarray:
    """Run the processor's own rescale/normalise over every uint8 value: exact by construction."""
    values = np.tile(np.arange(256, dtype=np.uint8), (3, 1))[:, None, :]  # a (3, 1, 256) channels-first image
    do_rescale, factor = bool(processor.do_rescale), processor.rescale_factor
    do_normalize, mean, std = bool(processor.do_normalize), processor.image_mean, processor.image_std
    if backend == TORCHVISION_BACKEND:
        batch = torch.from_numpy(values)[None]
        if do_rescale or do_normalize:
            batch = processor.rescale_and_normalize(batch, do_rescale, factor, do_normalize, mean, std)
        return batch[0, :, 0].to(torch.float32).numpy().copy()
    out: np.ndarray = values
    if do_rescale:
        out = processor.rescale(out, factor)
    if do_normalize:
        out = processor.normalize(out, mean, std)
    return out[:, 0].astype(np.float32)


def _check_standard(processor: Any) -> str:
    """The backend name, after making sure the processor runs the standard pipeline and nothing else."""
    if isinstance(processor, TorchvisionBackend):
        base, backend = TorchvisionBackend, TORCHVISION_BACKEND
    elif isinstance(processor, PilBackend):
        base, backend = PilBackend, PIL_BACKEND
    else:
        raise TypeError(f"{type(processor).__name__} is not a transformers PIL or torchvision image processor")
    for name in _PIPELINE_METHODS:
        if getattr(type(processor), name, None) is not getattr(base, name, None):
            raise ValueError(
                f"{type(processor).__name__} overrides {name}(); ImageTransform only reproduces the standard "
                "resize / centre crop / rescale / normalise pipeline (CLIP, SigLIP and the like)"
            )
    if processor.do_pad:
        raise ValueError(f"{type(processor).__name__} pads (do_pad=True), which ImageTransform does not reproduce")
    return backend


def spec_from_processor(processor: Any) -> PreprocessSpec:
    """Read the settings of a CLIP/SigLIP-style processor (either backend) into a `PreprocessSpec`."""
    backend = _check_standard(processor)
    resample = _pil_filter(processor.resample)
    if backend == TORCHVISION_BACKEND and processor.do_resize and resample not in _PIL_TO_TORCH_MODE:
        raise ValueError(f"resample {resample!r} with the torchvision backend is not reproduced; use backend='pil'")
    crop = None
    if processor.do_center_crop:
        crop_size = processor.crop_size
        if crop_size is None or not (crop_size.height and crop_size.width):
            raise ValueError(f"centre crop needs crop_size with height and width, got {crop_size}")
        crop = (int(crop_size.height), int(crop_size.width))
    return PreprocessSpec(backend, _resize_rule(processor), resample, crop, _lookup_table(processor, backend))


def _native_uint8_bilinear() -> bool:
    # torchvision's _do_native_uint8_resize_on_cpu for bilinear
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_torch(chw: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize(antialias=True) on a uint8 CHW tensor, as TorchvisionBackend uses it.

    torchvision (>= 0.21) resizes uint8 natively on CPU for bicubic and (on AVX2/AVX512/arm) bilinear; elsewhere it goes
    through float32, clamps bicubic and rounds. Same-size inputs come back untouched.
    """
    if tuple(chw.shape[-2:]) == tuple(size):
        return chw
    mode = _PIL_TO_TORCH_MODE[resample]
    antialias = mode != "nearest-exact"
    align = None if mode == "nearest-exact" else False
    native = mode != "bilinear" or _native_uint8_bilinear()
    x = chw[None] if native else chw[None].to(torch.float32)
    out = torch.nn.functional.interpolate(x, size=list(size), mode=mode, align_corners=align, antialias=antialias)
    if not native:
        out = out.round_().to(torch.uint8)
    return out[0]


def image_processor_for_vision_config(vision_config: Any) -> PilBackend:
    """The processor that goes with a randomly initialised CLIP or SigLIP vision tower (no hub download).

    CLIP: resize the shortest edge to `image_size`, centre crop `image_size` square, OpenAI CLIP mean/std, bicubic.
    SigLIP: resize to `image_size` square (no crop), mean/std 0.5, bicubic. The PIL-backend classes are used so the
    processor works without torchvision; `save_pretrained` writes the usual `CLIPImageProcessor` /
    `SiglipImageProcessor` type, which `AutoImageProcessor` loads back.
    """
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    config = getattr(vision_config, "vision_config", None) or vision_config  # a full CLIPConfig/SiglipConfig too
    model_type = getattr(config, "model_type", None)
    if model_type == "clip_vision_model":
        size = int(config.image_size)
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if model_type == "siglip_vision_model":
        size = int(config.image_size)
        return SiglipImageProcessorPil(size={"height": size, "width": size})
    raise ValueError(f"no image processor rule for vision config type {model_type!r} (CLIP or SigLIP only)")
