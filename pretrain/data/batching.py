"""Samples -> micro-batches: padded rows, or packed rows with position ids restarting per sample.

Packed rows carry no attention mask: transformers derives the block-diagonal causal mask from position ids that
restart at 0 (sdpa/eager/flex) or the varlen boundaries (flash-attention 2), so attention never crosses samples.
Every batch also carries `sample_lengths` so the boundaries can be checked or used by kernels that want them.

Host-computed indices, so the training forward never reads device values back (a sync that drains the GPU queue):
`label_index` holds the flat positions (row x width + column) whose next token is a label, `label_targets` those
labels, `n_labels` their count as a Python int. Images: `pixel_values` is the samples' tiles concatenated, (tiles,
3, H, W), in row-major sample order, or None; `image_tiles` and `image_sizes` are per image, flat, in the same order.
`image_texts` are the label tokens of each single-image sample and `image_pair_index` the index of its image in that
flat order (the alignment objectives' pairs: a multi-image sample has no one image its text describes).
Clips: `video_pixels` is their sampled frames concatenated, (frames, 3, S, S), in sample order, or None, and
`video_frames` each clip's frame count; the model runs them through the tower in one call with the image tiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pretrain.data.sample import ProcessedSample
from pretrain.tokens import IGNORE

PAD_TO_MULTIPLE = 8  # a batch's width is rounded up to a multiple of this


def padded_width(row_lengths: Iterable[int], pad_to_multiple: int = PAD_TO_MULTIPLE,
                 widths: tuple[int, ...] | None = None) -> int:
    """The width a batch of rows of these lengths is padded to: the longest rounded up to `pad_to_multiple`, then
    the smallest of `widths` that holds it (kernels compiled per shape), where given."""
    width = -(-max(row_lengths) // pad_to_multiple) * pad_to_multiple
    return min((w for w in widths or () if w >= width), default=width)


def label_count(labels: torch.Tensor | Sequence[int]) -> int:
    """Positions whose next token is a label, where the LM head and the loss run: of one sample's labels or of a
    batch's (rows, width) tensor. On a host tensor it reads nothing back from a device."""
    return int((torch.as_tensor(labels)[..., 1:] != IGNORE).sum())


def collate(rows: list[list[ProcessedSample]], pad_id: int, pad_to_multiple: int = PAD_TO_MULTIPLE,
            widths: tuple[int, ...] | None = None) -> dict:
    """Each row is a list of samples laid end to end (one sample per row when not packing), padded to
    `padded_width`."""
    width = padded_width((sum(len(s) for s in row) for row in rows), pad_to_multiple, widths)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    pixels, sample_lengths, image_tiles, image_sizes, pair_index, pair_texts = [], [], [], [], [], []
    video_pixels, video_frames = [], []
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            k = len(s)
            input_ids[r, at : at + k] = torch.tensor(s.input_ids)
            labels[r, at : at + k] = torch.tensor(s.labels)
            position_ids[r, at : at + k] = torch.arange(k)
            attention_mask[r, at : at + k] = 1
            if s.pixel_values is not None:
                px = s.pixel_values if s.pixel_values.dim() == 4 else s.pixel_values[None]
                tiles = s.image_tiles or [int(px.shape[0])]
                if len(tiles) == 1 and s.video_pixels is None:
                    pair_index.append(len(image_tiles))
                    pair_texts.append([t for t in s.labels if t != IGNORE])
                pixels.append(px)
                image_tiles += tiles
                image_sizes += s.image_sizes or [tuple(px.shape[-2:])] * len(tiles)
            if s.video_pixels is not None:
                video_pixels.append(s.video_pixels)
                video_frames.append(int(s.video_pixels.shape[0]))
            at += k
        # Padding continues the positions so the pad tail reads as one more (fully masked) segment.
        position_ids[r, at:] = torch.arange(width - at)
        sample_lengths.append([len(s) for s in row])
    label_index, label_targets = label_positions(labels)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_tiles": image_tiles,
        "image_sizes": image_sizes,
        "video_pixels": torch.cat(video_pixels) if video_pixels else None,
        "video_frames": video_frames,
        "sample_lengths": sample_lengths,
        "n_samples": sum(len(row) for row in rows),
        "packed": any(len(row) > 1 for row in rows),
        "label_index": label_index,
        "label_targets": label_targets,
        "n_labels": int(label_index.numel()),
        "image_texts": pair_texts,
        "image_pair_index": pair_index,
    }


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions whose next token is a label, those labels) of a (rows, width) label tensor: the rows of the
    flattened hidden states where the LM head and the loss run."""
    keep = labels[:, 1:] != IGNORE
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, labels[rows, cols + 1]


def vision_cost(sample: ProcessedSample) -> int:
    """Tiles and clip frames the vision tower runs for a sample (one tile per image without tiling): its pixels
    are None or (tiles, 3, H, W), its clip's None or (frames, 3, H, W)."""
    tiles = 0 if sample.pixel_values is None else sample.pixel_values.shape[0]
    return tiles + (0 if sample.video_pixels is None else sample.video_pixels.shape[0])


class Batcher:
    """Greedy row filling. `push` returns a finished micro-batch (list of rows) or None. A sample that does not fit
    the current row starts the next one; the sample that overflows a full micro-batch is carried to the next.

    With `max_images`, a micro-batch also ends before the sample whose images (tiles) would take it past that many,
    so the vision tower's work per step is bounded; such a batch has fewer rows. The caller skips a sample that
    alone costs more (it could never fit)."""

    def __init__(self, rows_per_batch: int, max_length: int, packing: bool, max_images: int | None = None) -> None:
        self.rows_per_batch, self.max_length, self.packing = rows_per_batch, max_length, packing
        self.max_images = max_images
        self.rows: list[list] = []
        self.current: list = []
        self.current_len = 0
        self.images = 0  # vision cost of the batch being filled (rows and the open row)

    def push(self, item, length: int, images: int = 0) -> list[list] | None:
        over = self.max_images is not None and self.images + images > self.max_images
        if not self.packing:
            # rows_per_batch 1 empties the rows at every push, so a budget cut never leaves them full here.
            batch = self._take() if over and self.rows else None
            self.rows.append([item])
            self.images += images
            if batch is None and len(self.rows) == self.rows_per_batch:
                batch = self._take()
            return batch
        if self.current and (over or self.current_len + length > self.max_length):
            self.rows.append(self.current)
            self.current, self.current_len = [], 0
            if over or len(self.rows) == self.rows_per_batch:
                batch = self._take()
                self.current, self.current_len, self.images = [item], length, images
                return batch
        self.current.append(item)
        self.current_len += length
        self.images += images
        return None

    def _take(self) -> list[list]:
        rows, self.rows = self.rows, []
        self.images = 0
        return rows

    def pending(self) -> list:
        """Items held back (for the resume state): rows done so far and the open row."""
        return [x for row in self.rows for x in row] + list(self.current)
