"""The vision tower's work split across a process group (the sequence-parallel group), not repeated on each rank.

The ranks of a sequence-parallel group hold the same micro-batch: without a split each would run the tower over all
of its image tiles and video frames. Here each rank encodes 1/N of them and the features are all-gathered, so every
rank holds what the plain tower call returns (the decoder's embedding needs every image's features before the
sequence is split) for 1/N of the tower's FLOPs and saved activations.

ZeRO-3 lockstep: the tile count is padded up to a multiple of N (at least one tile per rank) with black tiles, so
every rank calls the tower once with the same shape, also when the micro-batch has fewer tiles than N, or none.

Gradients: every rank's loss uses the gathered features, so the gradient of this rank's rows is the sum over the
group of every rank's gradient for them: the gather's backward is a reduce-scatter (pretrain.distributed's
all_gather_with_grad). Summed over the group (as the data-parallel reduction of a sequence-parallel run does) the
tower's gradients are the unsplit tower's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from pretrain import distributed


def rows_per_rank(count: int, world: int) -> int:
    """Tiles each rank of a group of `world` encodes for a micro-batch of `count`: count padded up to a multiple
    of `world`, never less than one (every rank calls the tower, whatever the data)."""
    if world < 1 or count < 0:
        raise ValueError(f"rows_per_rank: count {count} and world {world} (need count >= 0, world >= 1)")
    return max(1, -(-count // world))


def rank_slice(pixels: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's `rows_per_rank` tiles of `pixels` (tiles first), black tiles where the count runs out."""
    per = rows_per_rank(pixels.shape[0], world)
    mine = pixels[rank * per : (rank + 1) * per]
    if mine.shape[0] < per:
        mine = torch.cat([mine, mine.new_zeros((per - mine.shape[0], *pixels.shape[1:]))])
    return mine


def encode_split(encode: Callable[[torch.Tensor], Any], pixels: torch.Tensor, group: Any) -> Any:
    """`encode(pixels)` computed 1/N per rank of `group`: each rank encodes its `rank_slice`, the results are
    all-gathered (differentiably) and the padding dropped. `encode` returns a tensor, a tuple or a ModelOutput
    of tensors whose first dimension is the tile (None entries stay None); so does this, as `encode(pixels)` would."""
    rank, world = distributed.rank_and_world(group)
    count = pixels.shape[0]
    out = encode(rank_slice(pixels, rank, world))
    return gather_rows(out, rows_per_rank(count, world), count, group)


def gather_rows(out: Any, per: int, count: int, group: Any) -> Any:
    """Every rank's `out` (tensors of `per` rows each), concatenated in rank order and cut to `count` rows."""
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != per:
            raise ValueError(f"the tower returned a tensor of shape {tuple(out.shape)} for {per} tiles: "
                             "only per-tile outputs can be gathered")
        return torch.cat(distributed.all_gather_with_grad(out, group))[:count]
    if isinstance(out, ModelOutput):
        return type(out)(**{k: gather_rows(v, per, count, group) for k, v in out.items()})
    if isinstance(out, tuple | list):
        return type(out)(gather_rows(v, per, count, group) for v in out)
    raise TypeError(f"cannot gather a {type(out).__name__} from the tower")


class SplitTower(nn.Module):
    """Stands in for the vision tower where transformers' get_image_features and pretrain.model.video call it:
    the same call, split across `group` by encode_split. Only the hidden states the model reads (`layers`, as
    `vision_feature_layer` names them) are gathered, the others come back None, as do the last hidden state and
    pooled output (the VLM reads neither): CLIP-L would otherwise send 25 layers' states for the one it uses."""

    def __init__(self, tower: nn.Module, group: Any, layers: int | Iterable[int]) -> None:
        super().__init__()
        self.tower = tower
        self.group = group
        self.layers = (layers,) if isinstance(layers, int) else tuple(layers)

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return encode_split(lambda tiles: self.kept(self.tower(tiles, *args, **kwargs)), pixel_values, self.group)

    def kept(self, out: ModelOutput) -> ModelOutput:
        states = out.hidden_states
        if states is None:
            raise ValueError("the vision tower returned no hidden states: the VLM selects its features from them")
        wanted = {k % len(states) for k in self.layers}
        return type(out)(hidden_states=tuple(s if i in wanted else None for i, s in enumerate(states)))


@contextlib.contextmanager
def split_tower(vlm: nn.Module, group: Any) -> Iterator[None]:
    """A SplitTower over `vlm`'s vision tower in its place for the calls inside (transformers looks it up there)."""
    inner = vlm.model
    tower = inner._modules["vision_tower"]
    inner._modules["vision_tower"] = SplitTower(tower, group, vlm.config.vision_feature_layer)
    try:
        yield
    finally:
        inner._modules["vision_tower"] = tower
