"""What one GPU trains per micro-step, and how the cluster is run: the unit the planner prices."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.config import batch_split
from pretrain.model.flops import ParamCounts, StepFlops, VLMShape, batch_flops, step_flops
from pretrain.plan.lengths import BatchMix, SampleCost, batch_mix
from pretrain.plan.lora import LoraCounts


@dataclass(frozen=True)
class Workload:
    """What one GPU trains per micro-step, and how the cluster is run."""

    shape: VLMShape
    stage: str = "align"
    seq_len: int = 2048  # tokens per row (a packed row, or the padded sample when not packing)
    sample_len: int = 640  # decoder tokens per sample, image tokens included
    images_per_sample: int = 1  # vision tower passes per sample: its images, or with AnyRes all their tiles
    logit_tokens: int = 64  # positions per sample where the LM head runs (the label tokens)
    packing: bool = True
    micro_batch: int = 1  # rows per GPU per micro-step
    grad_accum: int = 1
    global_batch: int | None = None  # rows per optimizer step; fixed across cluster sizes when set
    precision: str = "bf16"
    checkpointing: str = "none"  # none | full | every_k
    checkpointing_every_k: int = 2
    chunked_ce: bool = True
    # Decoder positions the images of a sample take; None: image_tokens per tower pass (AnyRes differs: its grid
    # features are unpadded and get a newline per row).
    decoder_image_tokens: int | None = None
    # The data's samples (pretrain.plan.lengths.shard_samples): rows are filled and padded from them as the loader
    # does. None: every sample is `sample_len` tokens with one image, packed rows ~98% full, no padding.
    samples: tuple[SampleCost, ...] | None = field(default=None, repr=False)
    dense_attention: bool = True  # sdpa/eager run width^2 pairs per row; flex/flash only each sample's own
    # LoRA (pretrain.plan.lora): adapter parameters added, and base parameters of trained parts it freezes.
    lora: LoraCounts = LoraCounts()
    # Ulysses sequence parallelism (deepspeed.sequence_parallel_size): the N ranks of a group share each row, every
    # rank does 1/N of its work (the tower's tiles and frames too) and keeps 1/N of its activations; the batch splits
    # over data-parallel ranks only.
    sequence_parallel: int = 1

    def trained_params(self, counts: ParamCounts) -> int:
        """Parameters with gradients and optimizer state: the stage's, with LoRA's adapters in place of its base."""
        return counts.trainable(self.stage) - self.lora.frozen_base + self.lora.adapters

    @property
    def image_positions(self) -> int:
        """Decoder positions per sample that hold image tokens."""
        if self.decoder_image_tokens is not None:
            return self.decoder_image_tokens
        return self.shape.image_tokens * self.images_per_sample

    @property
    def samples_per_row(self) -> float:
        """Packed rows are filled to the brim by samples of this length on average (packers reach ~98%)."""
        return self.seq_len / self.sample_len if self.packing else 1.0

    @property
    def row_tokens(self) -> int:
        return self.seq_len if self.packing else self.sample_len

    @property
    def peak_row_tokens(self) -> int:
        """Row width of the widest micro-batch, which sets the activation peak: a padded batch reaches its longest
        sample's length."""
        if self.samples is None or self.packing:
            return self.row_tokens
        return min(self.seq_len, max(s.length for s in self.samples))

    def split_for(self, n_gpus: int) -> tuple[int, int] | None:
        """(rows per micro-step, accumulation steps) at this cluster size, or None if the global batch cannot split
        over its data-parallel ranks: the same answer the trainer's batch check gives as its fix
        (pretrain.config.batch_split)."""
        if n_gpus % self.sequence_parallel:
            return None
        return batch_split(self.global_batch, self.micro_batch, self.grad_accum, n_gpus // self.sequence_parallel)

    def all_to_all_bytes(self) -> float:
        """Bytes one GPU sends per micro-step in Ulysses' all-to-alls: in every decoder layer q, k, v go and the
        attention output comes back, forward, backward and in a re-forward of a checkpointed layer; each time the
        rank's 1/N of the row's tokens, (N-1)/N of them to the other ranks."""
        n = self.sequence_parallel
        if n == 1:
            return 0.0
        llm, a = self.shape.llm, 2 if self.precision == "bf16" else 4
        passes = 2 * llm.layers + self.checkpointed_layers(llm.layers)
        tokens = self.micro_batch * self.peak_row_tokens / n
        return passes * tokens * a * (2 * llm.q_dim + 2 * llm.kv_dim) * (n - 1) / n

    def checkpointed_layers(self, layers: int) -> int:
        if self.checkpointing == "full":
            return layers
        if self.checkpointing == "every_k":
            return math.ceil(layers / self.checkpointing_every_k)
        return 0

    def micro_flops(self) -> StepFlops:
        """Model FLOPs of one micro-step on one GPU."""
        layers = self.shape.llm.layers
        one = step_flops(self.shape, [self.sample_len], images=self.images_per_sample,
                         logit_tokens=self.logit_tokens, stage=self.stage,
                         recompute_fraction=self.checkpointed_layers(layers) / layers)
        if self.samples is None:
            return one.scaled(self.micro_batch * self.samples_per_row)
        mix = self.batch()
        return batch_flops(self.shape, mix.tokens, mix.sample_pairs, round(mix.samples), mix.images, mix.labels,
                           self.stage, self._recompute_fraction(), self.decoder_image_tokens)

    def batch(self) -> BatchMix:
        """One micro-batch of the data, as the loader builds it (None samples: uniform samples, packed ~98% full)."""
        if self.samples is None:
            n = self.micro_batch * self.samples_per_row
            pairs = n * self.sample_len**2
            return BatchMix(self.micro_batch, n * self.sample_len, n * self.sample_len, pairs, pairs, n,
                            n * self.images_per_sample, n * self.logit_tokens, 0.0)
        return batch_mix(self.samples, self.micro_batch, self.seq_len, self.packing)

    def hardware_flops(self) -> float:
        """FLOPs one micro-step makes the hardware do: the model's over the padded rows (a dense-mask kernel over
        all width^2 pairs per row), plus the re-forward of activation checkpointing."""
        if self.samples is None:
            flops = self.micro_flops()
            return flops.total + flops.recompute
        mix = self.batch()
        flops = batch_flops(self.shape, mix.padded_tokens, mix.dense_pairs if self.dense_attention
                            else mix.sample_pairs, round(mix.samples), mix.images, mix.labels, self.stage,
                            self._recompute_fraction(), self.decoder_image_tokens)
        return flops.total + flops.recompute

    def _recompute_fraction(self) -> float:
        return self.checkpointed_layers(self.shape.llm.layers) / self.shape.llm.layers
