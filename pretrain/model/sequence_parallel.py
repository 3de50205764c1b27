"""Ulysses sequence parallelism on DeepSpeed's ALST (`deepspeed.runtime.sequence_parallel.ulysses_sp`).

`deepspeed.sequence_parallel_size: N` makes groups of N consecutive ranks that read the same samples. Every rank of a
group builds the whole micro-batch's embedding (image and frame features placed in it), then keeps 1/N of the
sequence: the rows padded to a multiple of N and cut into N contiguous shards, shard i on the group's rank i. The
decoder runs on the shard; in each attention layer DeepSpeed's `UlyssesSPAttentionHF` swaps sequence for heads with
an all-to-all (each rank then holds the whole sequence for H/N heads), calls the core attention, and swaps back.

Masks. DeepSpeed's wrapper drops every mask (it all-gathers the position ids, which RoPE already used on each
shard). The sample boundaries are known on the host (`sample_lengths`, as in pretrain.model.attention): the core
attention runs causal sdpa on each sample and pad tail of the whole row on its own (`segment_sdpa`), so packed rows
keep their boundaries across the split, no L x L mask is built, and nothing is read back from the device.

Registration. DeepSpeed's own `register_with_transformers` replaces transformers' attention function of the core's
name for every model, and the vision tower runs sdpa too (with no position ids, which the wrapper requires). So the
wrapper goes under a name of its own (`ULYSSES`) that only the decoder's config names; transformers builds no mask
for a name it has no mask function for, which is what the wrapper wants.

Loss. The shard's label rows (positions whose next token is a label) are found on the host (`shard_batch`, before
the batch reaches the device): each rank computes the loss over its rows only, and its label count is its rows' count,
so the step's all-reduced count is the global batch's and the mean is unchanged. DeepSpeed divides the gradients
summed over all ranks by a stage-dependent number (`gradient_divisor`), which the step's scale multiplies back.

Lockstep: the ranks of a group hold the same samples, so they pad to the same width and call the same modules;
different groups differ only in sizes, and the all-to-alls stay inside a group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.config import ConfigError
from pretrain.model.attention import row_segments
from pretrain.tokens import IGNORE

# The decoder's attention implementation under sequence parallelism (an ALL_ATTENTION_FUNCTIONS key of our own).
ULYSSES = "ulysses_segment_sdpa"


@dataclass
class SequenceParallel:
    group: Any  # the process group of this rank's N ranks
    rank: int  # this rank's place in it: the shard it keeps
    size: int
    attention: Any = None  # DeepSpeed's UlyssesSPAttentionHF, once registered
    active: bool = False  # the decoder runs on a shard now (else: plain sdpa, e.g. caption generation)
    segments: list[list[int]] | None = None  # the whole rows' samples and pad tails, for the core attention

    @contextlib.contextmanager
    def sharded(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


def check_heads(size: int, heads: int, kv_heads: int) -> None:
    """Ulysses gives each rank heads / N query heads and splits (or replicates) the KV heads: N must divide the
    query heads, and the KV heads must divide by N or N by them."""
    if size <= 1:
        return
    if heads % size:
        raise ConfigError(f"deepspeed.sequence_parallel_size={size} must divide the decoder's attention heads "
                          f"({heads})")
    if kv_heads % size and size % kv_heads:
        raise ConfigError(f"deepspeed.sequence_parallel_size={size} and the decoder's KV heads ({kv_heads}) must "
                          "divide one another")


def gradient_divisor(zero_stage: int, world_size: int, size: int) -> int:
    """What DeepSpeed divides the gradients summed over all ranks by under sequence parallelism: ZeRO-3's
    reduce-scatter by the world size, ZeRO 0-2's all-reduce by the data-parallel size (world / N). (ZeRO-3's
    all-reduce path divides by world / N too, per bucket, so the DeepSpeed config keeps reduce_scatter on.)"""
    return world_size if zero_stage == 3 else world_size // size


def shard_width(width: int, size: int) -> int:
    """Tokens per shard of a row `width` tokens wide, padded to a multiple of `size`."""
    return -(-width // size)


def shard_batch(batch: dict, sp: SequenceParallel | None) -> dict:
    """The host batch with its label rows cut to this rank's shard: `labels` keep only the shard's label positions
    (so label counts are the shard's), `label_index` indexes the shard's flattened rows. Host work only."""
    if sp is None:
        return batch
    rows, width = batch["input_ids"].shape
    local = shard_width(width, sp.size)
    start = sp.rank * local
    labels = batch["labels"]
    # Position t predicts labels[:, t + 1]: keep the labels whose predicting position lies in the shard.
    column = torch.arange(width)
    keep = (column - 1 >= start) & (column - 1 < start + local)
    shard_labels = torch.where(keep, labels, torch.full_like(labels, IGNORE))
    index, targets = batch["label_index"], batch["label_targets"]
    t = index % width
    mine = (t >= start) & (t < start + local)
    local_index = (index[mine] // width) * local + (t[mine] - start)
    return {**batch, "labels": shard_labels, "label_index": local_index, "label_targets": targets[mine],
            "n_labels": int(local_index.numel())}


def decode_shard(decoder: torch.nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor,
                 sample_lengths: list[list[int]], sp: SequenceParallel) -> torch.Tensor:
    """The decoder's last hidden states of this rank's shard of `embeds` (rows, width, hidden): the rows padded to a
    multiple of N (the pad one more segment, from position 0), then the rank's contiguous 1/N."""
    rows, width = embeds.shape[:2]
    local = shard_width(width, sp.size)
    pad = local * sp.size - width
    if pad:
        embeds = torch.cat([embeds, embeds.new_zeros(rows, pad, embeds.shape[2])], dim=1)
        tail = torch.arange(pad, device=position_ids.device).expand(rows, pad)
        position_ids = torch.cat([position_ids, tail], dim=1)
    cut = slice(sp.rank * local, (sp.rank + 1) * local)
    sp.segments = row_segments(sample_lengths, local * sp.size)
    with sp.sharded():
        out = decoder(inputs_embeds=embeds[:, cut], position_ids=position_ids[:, cut], attention_mask=None,
                      use_cache=False)
    return out.last_hidden_state


def segment_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 segments: list[list[int]], **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The core attention behind DeepSpeed's all-to-all, over the whole rows (this rank's heads): causal sdpa over
    each segment (sample, or pad tail) on its own. No L x L mask exists (sdpa turns a boolean mask into a saved
    float32 one per layer: 256 MiB at 8k tokens), and the blocks across samples are never computed. The loop runs
    over host numbers and calls no module (lockstep holds)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("position_ids", None)
    rows = []
    for b, row in enumerate(segments):
        parts, start = [], 0
        for n in row:
            piece = slice(start, start + n)
            out, _ = sdpa_attention_forward(module, query[b:b + 1, :, piece], key[b:b + 1, :, piece],
                                            value[b:b + 1, :, piece], None, **kwargs)
            parts.append(out)
            start += n
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows), None


def register_ulysses(text_config: Any, sp: SequenceParallel, micro_batch: int) -> None:
    """Build DeepSpeed's Ulysses attention for the decoder and make the decoder's config use it (`ULYSSES`)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    check_heads(sp.size, heads, kv_heads)
    def core(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return segment_sdpa(module, query, key, value, sp.segments, **kwargs)

    sp.attention = UlyssesSPAttentionHF(
        attn=core, batch_size=micro_batch, attn_head_count=heads,
        attn_head_size=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        kv_head_count=kv_heads, num_hidden_layers=text_config.num_hidden_layers, process_group=sp.group,
        seq_length_is_variable=True)

    def ulysses(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if not sp.active:  # a whole sequence on one rank (generation): plain causal sdpa
            kwargs.pop("position_ids", None)
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        fit_rows(sp.attention, query.shape[0])
        return sp.attention(module, query, key, value, None, *args, **kwargs)

    AttentionInterface.register(ULYSSES, ulysses)
    text_config._attn_implementation = ULYSSES


def fit_rows(attention: Any, rows: int) -> None:
    """DeepSpeed's wrapper checks shapes against a fixed row count; a partial micro-batch has fewer rows."""
    if attention.batch_size == rows:
        return
    attention.batch_size = rows
    for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
        shape = list(getattr(attention, name))
        shape[1] = rows
        setattr(attention, name, torch.Size(shape))
