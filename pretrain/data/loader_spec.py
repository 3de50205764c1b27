"""What a loader reads and how (LoaderSpec): its own module, so the loader and the elastic split of an epoch over
a new layout (pretrain.data.elastic, which the loader uses) both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoaderSpec:
    sources: list[list[str]]
    weights: list[float]
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    rows_per_batch: int = 1
    max_length: int = 2048
    packing: bool = False
    max_images_per_batch: int | None = None  # images / tiles per micro-batch; None: no limit
    pad_id: int = 0
    row_widths: tuple[int, ...] | None = None  # the only widths a batch is padded to (flex_attention); None: any
    epoch_size: int | None = None  # samples per epoch of a stream source (all slots together); None: its shards
    stream_timeout_s: float = 60.0  # `pipe:` / http(s) shards: no byte for this long fails the attempt ...
    stream_retries: int = 3  # ... and a failed attempt is retried this many times (pretrain.data.remote)
    single_pass: bool = False  # one epoch of every source, then the last (partial) batch and the end (validation)
