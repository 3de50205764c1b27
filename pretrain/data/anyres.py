"""AnyRes (LLaVA-NeXT): an image -> a best-fit grid of tower-size tiles plus a base thumbnail, as transformers'
LlavaNextImageProcessor makes them, and the image's decoder-token count, as LlavaNextProcessor counts it.

The processor's steps, with its own math (`select_best_resolution`, `get_patch_output_size`): pick the pinpoint
resolution that keeps the most of the image's pixels with the least waste; resize the image into it keeping its
aspect ratio; pad with zeros, centred, to the pinpoint; cut row-major into tower-size tiles; prepend the whole image
resized to the tower's square. Each tile then goes through the tower's own resize / crop / rescale / normalise,
which on a tower-size square is only the rescale / normalise lookup table of `ImageTransform`, so it is applied to
the padded canvas once. Output: (1 + rows x cols, 3, S, S), the base first.
The token count uses LlavaNextProcessor's own function (unpadded grid features + one newline per row + the base).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from pretrain.data.image import to_rgb
from pretrain.data.image_processors import spec_from_processor

MAX_GRID = 3  # the default pinpoints: every grid of 1..MAX_GRID x 1..MAX_GRID tiles


def default_pinpoints(tile: int, max_image_tiles: int | None = None) -> list[list[int]]:
    """[height, width] of every rows x cols grid of `tile`-size tiles with rows, cols <= MAX_GRID, leaving out grids
    whose tiles and base thumbnail exceed `max_image_tiles`."""
    grids = [(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    kept = [[r * tile, c * tile] for r, c in grids if max_image_tiles is None or r * c + 1 <= max_image_tiles]
    if not kept:
        raise ValueError(f"model.max_image_tiles={max_image_tiles} leaves no AnyRes grid: an image needs at least "
                         "2 tiles (one tile and the base image)")
    return kept


def grid_pinpoints(pinpoints: list[list[int]] | None, tile: int, max_image_tiles: int | None) -> list[list[int]]:
    """The configured pinpoints, else the default ones for a tower of `tile` pixels."""
    return [list(p) for p in pinpoints] if pinpoints else default_pinpoints(tile, max_image_tiles)


def largest_grid_cost(pinpoints: list[list[int]], tile: int, patch: int, base_tokens: int) -> tuple[int, int]:
    """(tiles, decoder tokens) of an image that fills the largest pinpoint exactly (no unpadding): the most one
    image can cost. `base_tokens`: the base thumbnail's tokens (patches, plus CLS where kept)."""
    height, width = max(pinpoints, key=lambda p: p[0] * p[1])
    rows, cols, side = height // tile, width // tile, tile // patch
    return 1 + rows * cols, base_tokens + rows * side * (cols * side + 1)  # + one newline per feature row


def anyres_image_processor(tower: Any, pinpoints: list[list[int]], tile: int) -> Any:
    """A LlavaNextImageProcessor (PIL backend: no torchvision needed) with the tower processor's settings.
    The crop size is set to the tile even for towers without a crop (SigLIP): LlavaNext cuts tiles of that size."""
    from transformers import LlavaNextImageProcessorPil

    size = {k: v for k, v in dict(tower.size).items() if v is not None}
    return LlavaNextImageProcessorPil(
        size=size, crop_size={"height": tile, "width": tile}, do_center_crop=bool(tower.do_center_crop),
        resample=tower.resample, do_rescale=tower.do_rescale, rescale_factor=tower.rescale_factor,
        do_normalize=tower.do_normalize, image_mean=list(tower.image_mean), image_std=list(tower.image_std),
        image_grid_pinpoints=pinpoints)


def is_anyres_processor(processor: Any) -> bool:
    return getattr(processor, "image_grid_pinpoints", None) is not None


def tile_processor(anyres: Any) -> Any:
    """The standard (CLIP-style) processor that one tile goes through inside the LlavaNext processor."""
    from transformers import CLIPImageProcessorPil

    size = {k: v for k, v in dict(anyres.size).items() if v is not None}
    crop = {k: v for k, v in dict(anyres.crop_size).items() if v is not None}
    return CLIPImageProcessorPil(
        size=size, crop_size=crop, do_center_crop=bool(anyres.do_center_crop), resample=anyres.resample,
        do_rescale=anyres.do_rescale, rescale_factor=anyres.rescale_factor, do_normalize=anyres.do_normalize,
        image_mean=list(anyres.image_mean), image_std=list(anyres.image_std), do_convert_rgb=True)


class AnyResTransform:
    """PIL picture -> (1 + tiles, 3, S, S) float32, equal to LlavaNextImageProcessor's pixel values of it."""

    def __init__(self, anyres: Any) -> None:
        spec = spec_from_processor(tile_processor(anyres))
        self.tile = int(dict(anyres.crop_size)["height"])
        if spec.output_size() != (self.tile, self.tile) or spec.resized_size(self.tile, self.tile) != (
                self.tile, self.tile):
            raise ValueError(f"the tower processor does not keep a {self.tile}-pixel tile as it is; AnyRes tiles "
                             "must be the tower's square input")
        self.pinpoints = [list(p) for p in anyres.image_grid_pinpoints]
        self.base_size = _base_size(anyres)
        self.resample = spec.resample
        self.lut = spec.lut

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        best_h, best_w = select_best_resolution((img.height, img.width), self.pinpoints)
        shape_only = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (img.height, img.width, 1))  # no copy
        new_h, new_w = get_patch_output_size(shape_only, (best_h, best_w), ChannelDimension.LAST)
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(img.resize((new_w, new_h), resample=self.resample), ((best_w - new_w) // 2,
                                                                          (best_h - new_h) // 2))
        base = img.resize(self.base_size[::-1], resample=self.resample)
        rows, cols, s = best_h // self.tile, best_w // self.tile, self.tile
        grid = self._normalised(np.asarray(canvas))  # (3, best_h, best_w)
        tiles = grid.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        out = np.concatenate([self._normalised(np.asarray(base))[None], tiles])
        return torch.from_numpy(np.ascontiguousarray(out))

    def _normalised(self, hwc: np.ndarray) -> np.ndarray:
        out = np.empty((3, *hwc.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], hwc[:, :, c], out=out[c])
        return out


def _base_size(anyres: Any) -> tuple[int, int]:
    """(height, width) the whole image is resized to for the base tile, as LlavaNextImageProcessor picks it."""
    size = dict(anyres.size)
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


class TokenCounter:
    """(height, width) -> image tokens, by LlavaNextProcessor's own count for that image size (a class, not a
    closure, so a SampleProcessor holding it pickles into worker processes)."""

    def __init__(self, hf_processor: Any) -> None:
        self.hf_processor = hf_processor

    def __call__(self, height: int, width: int) -> int:
        out = self.hf_processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        return int(out["num_image_tokens"][0])


def llava_next_processor(image_processor: Any, tokenizer: Any, vlm_config: Any) -> Any:
    """The LlavaNextProcessor of a LlavaNext config: what the export saves and what counts image tokens here."""
    from transformers import LlavaNextProcessor

    vision = vlm_config.vision_config
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        patch_size=vision.patch_size, vision_feature_select_strategy=vlm_config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if vision.model_type == "clip_vision_model" else 0, image_token="<image>")
