"""What the data makes of a micro-batch: the samples' lengths (read from the shards through the training data path)
run through the loader's own row filling and padding, giving the padded width the decoder runs over, the share of
it that is padding, the samples without an image and the label positions where the LM head runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

from pretrain.config import Config, ConfigError
from pretrain.data.batching import PAD_TO_MULTIPLE, Batcher, label_count, padded_width, vision_cost


@dataclass(frozen=True)
class SampleCost:
    """One sample as the loader sees it: decoder tokens (image tokens included), tower passes, label tokens."""

    length: int
    images: int
    labels: int


@dataclass(frozen=True)
class BatchMix:
    """Means per micro-batch on one rank over the batches the loader builds from a sequence of samples."""

    rows: float
    padded_tokens: float  # rows x padded width: what the decoder's matmuls run over
    tokens: float  # real tokens
    dense_pairs: float  # attention pairs of a dense-mask kernel (sdpa, eager): width^2 per row
    sample_pairs: float  # pairs a varlen kernel computes (flex, flash): each sample attends to itself
    samples: float
    images: float
    labels: float
    text_only: float  # samples without an image

    @property
    def padding_waste(self) -> float:
        """Share of the decoder's positions that are padding."""
        return 1.0 - self.tokens / self.padded_tokens

    @property
    def text_only_fraction(self) -> float:
        return self.text_only / self.samples


def batch_mix(samples: Sequence[SampleCost], micro_batch: int, max_length: int, packing: bool,
              pad_to_multiple: int = PAD_TO_MULTIPLE) -> BatchMix:
    """Fill rows as the loader does (pretrain.data.batching.Batcher), pad each batch to its longest row rounded up
    to `pad_to_multiple`, and average over the complete batches."""
    if not samples:
        raise ConfigError("no sample lengths to plan from (the shards gave no usable sample)")
    batcher = Batcher(micro_batch, max_length, packing)
    batches = [b for s in samples if (b := batcher.push(s, min(s.length, max_length), s.images))]
    if not batches:  # fewer samples than one batch: price the partial one
        batches = [batcher.rows + ([batcher.current] if batcher.current else [])]
    totals = [0.0] * 9
    for rows in batches:
        lengths = [[min(s.length, max_length) for s in row] for row in rows]
        width = padded_width(map(sum, lengths), pad_to_multiple)
        flat = [s for row in rows for s in row]
        for i, value in enumerate((len(rows), len(rows) * width, sum(map(sum, lengths)), len(rows) * width**2,
                                   sum(n * n for row in lengths for n in row), len(flat),
                                   sum(s.images for s in flat), sum(s.labels for s in flat),
                                   sum(s.images == 0 for s in flat))):
            totals[i] += value
    return BatchMix(*(t / len(batches) for t in totals))


def uniform_samples(length: int, images: int, labels: int) -> list[SampleCost]:
    """Every sample alike: the planner's stand-in when no shards are at hand."""
    return [SampleCost(length, images, labels)]


def shard_samples(cfg: Config, limit: int = 512) -> list[SampleCost]:
    """The first `limit` usable samples of the recipe's training shards, decoded, preprocessed and tokenized as the
    trainer does (a sample the loader would skip is skipped here too). Raises ConfigError when none can be read."""
    from pretrain.data.errors import SampleError
    from pretrain.data.stream import ShardReader, TarShardError
    from pretrain.data.urls import expand_urls, missing_shards
    from pretrain.model.processing import build_processing

    urls = [u for source in cfg.data.train for u in expand_urls([source.urls] if isinstance(source.urls, str)
                                                                 else list(source.urls))]
    missing = missing_shards(urls)
    if missing or not urls:
        raise ConfigError(f"data.train: no shard at {missing[0] if missing else 'the configured URLs'}")
    processor = build_processing(cfg).processor
    out: list[SampleCost] = []
    for url in urls:
        try:
            for raw in islice(ShardReader().iterate(url), limit - len(out)):
                try:
                    sample = processor(raw.parts)
                except SampleError:
                    continue
                out.append(SampleCost(len(sample), vision_cost(sample), label_count(sample.labels)))
        except (OSError, TarShardError) as err:
            raise ConfigError(f"data.train: cannot read {url} for the length distribution: {err}") from None
        if len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"data.train: no usable sample in {', '.join(urls[:3]) or 'no shard'}")
    return out
