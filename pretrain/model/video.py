"""Images and clip frames through one vision-tower call, as transformers' LlavaNextVideo computes each.

Why LlavaNextVideo (and not LlavaOnevision): its image path is LlavaNext's, the AnyRes path this project trains
and exports (best-fit grid, unpadded features, a learned newline per row, no pooling of large grids), and its
weights are LlavaNext's names with nothing added (the pooler is a parameter-free stride-2 average), so an AnyRes
model gains video without a new parameter. LlavaOnevision's images differ (its `anyres_max_9` downsamples large
grids and its processor picks and counts tiles differently), so our images would not be its images.

LlavaNextVideo's own forward runs the tower twice (images, then frames) and the projector twice. Here the tower runs
once on the image tiles and the frames together, and the projector once on all their tokens (it is per token, so
the result is the same): ZeRO-3 lockstep needs every rank to call the same modules the same number of times, and a
rank with no clip in its micro-batch then makes the same calls as one with clips (its frame part is empty).
Per frame: the selected tower features (CLS dropped under `default`), then the exported class's own pooler
(`vision_resampler`, average pooling of stride 2 over the patch grid), then the projector; a clip's tokens are its
frames' in order, without newlines, as LlavaNextVideoModel.get_video_features returns them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches


def is_video_model(vlm: nn.Module) -> bool:
    return hasattr(vlm.model, "vision_resampler")


def tokens_per_frame(vision_config, stride: int = 2) -> int:
    """Decoder positions one frame takes, as LlavaNextVideoProcessor counts them: the patch grid / stride^2."""
    side = vision_config.image_size // vision_config.patch_size
    return side * side // (stride * stride)


def image_and_video_features(vlm: nn.Module, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]],
                             video_pixels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features: every image's unpadded grid + newlines + base, in image order, (tokens, hidden);
    video features: every frame's pooled tokens, in frame order, (tokens, hidden)) from one tower call on the image
    tiles `pixel_values` (tiles, 3, S, S) and the frames `video_pixels` (frames, 3, S, S) or None."""
    cfg, model = vlm.config, vlm.model
    n_tiles = pixel_values.shape[0]
    if video_pixels is not None:
        pixel_values = torch.cat([pixel_values, video_pixels.to(pixel_values.dtype)])
    out = model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layer = cfg.vision_feature_layer
    selected = out.hidden_states[layer] if isinstance(layer, int) else torch.cat(
        [out.hidden_states[i] for i in layer], dim=-1)
    if cfg.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    tiles, frames = selected[:n_tiles], selected[n_tiles:]
    pooled = model.vision_resampler(frames)
    projected = model.multi_modal_projector(torch.cat([tiles.flatten(0, 1), pooled.flatten(0, 1)]))
    n_image = tiles.shape[0] * tiles.shape[1]
    per_image = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in image_sizes]
    grids = torch.split(projected[:n_image].view(tiles.shape[0], tiles.shape[1], -1), per_image)
    images, _ = model.pack_image_features(grids, [list(s) for s in image_sizes], cfg.vision_feature_select_strategy,
                                          image_newline=model.image_newline)
    return torch.cat(list(images)) if isinstance(images, list | tuple) else images, projected[n_image:]
