"""The training forward: LlavaForConditionalGeneration in, summed next-token loss and label count out.

Why not `model(**batch).loss`: (1) the loss must be averaged over the label tokens of the whole global batch, so we
return a sum and let the trainer divide; (2) logits are computed only at label positions, by a fused, chunked head +
cross-entropy (pretrain.model.loss) whose memory is O(chunk x vocabulary) in forward and backward; (3) ZeRO-3
lockstep, below; (4) no host syncs: label positions, label count and the alignment pairs come from the host batch
(pretrain.data.batching.collate), so the forward never reads a device value back.

ZeRO-3 lockstep, the rule for anything added here: under ZeRO-3 every module call gathers that module's parameters
(and its backward gathers them again and reduce-scatters the gradients), collectives that every rank must issue in
the same order. So on every rank the forward calls the same modules, the same number of times, in the same order,
whatever the data: never a module call inside a loop whose length depends on the data (label count, image count,
pair count), never a branch that skips a module for some batches. Concretely: the vision tower runs on a dummy image
when a micro-batch has none (its output times zero), the LM head is called once per forward whatever the label count
(none included: the chunk loop runs inside that call), and the alignment objectives run a dummy row where a
micro-batch has no pair. Loops over data belong inside one module call, on tensors, or on the host.
tests/model/test_lockstep.py trains 2 ZeRO-3 ranks on deliberately uneven data under a timeout to hold this.

Alignment objectives (`objectives:` in the config; see pretrain.model.alignment). The trainer divides the summed loss
of every micro-batch by the label-token count N of the whole global batch. A per-micro-batch mean loss L_a (the
contrastive or ITM loss of its pairs) is therefore added as `weight x L_a x n`, n being this micro-batch's label
count: after the trainer's division the step optimises
    caption_weight x (mean token loss) + weight x sum_mb(n_mb / N x L_a,mb),
i.e. the weight times the label-weighted average of the micro-batches' alignment losses (their plain average when
micro-batches carry equal label counts), whatever the accumulation and data-parallel sizes. In eval mode (validation)
the forward returns the plain token loss only, so validation loss and perplexity stay language-model numbers.
The alignment path runs every step on every rank, with a dummy row where a micro-batch has no pair (lockstep).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from pretrain.config import ObjectivesConfig
from pretrain.data.batching import label_positions, padded_width
from pretrain.model.alignment import AlignmentHeads, training_loss
from pretrain.model.attention import attention_inputs, decode_rows
from pretrain.model.frozen import FrozenTower
from pretrain.model.loss import LOSS_CHUNK, linear_cross_entropy
from pretrain.model.sequence_parallel import SequenceParallel, decode_shard
from pretrain.model.video import image_and_video_features, is_video_model
from pretrain.model.vision_split import split_tower

log = logging.getLogger(__name__)


class VLMForTraining(nn.Module):
    def __init__(self, vlm: LlavaForConditionalGeneration, objectives: ObjectivesConfig | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.vlm = vlm
        self.objectives = o = objectives or ObjectivesConfig()
        # Extra parameters live here, inside the module DeepSpeed wraps, so ZeRO partitions and checkpoints them;
        # the Hugging Face export takes only `vlm.*`.
        self.alignment = None
        if o.alignment:
            self.alignment = AlignmentHeads(vlm.config.text_config.hidden_size, o.embed_dim, o.temperature_init,
                                            o.learnable_temperature, o.max_logit_scale, o.itm_weight > 0, seed)
        self.last_losses: dict[str, torch.Tensor] = {}  # detached parts of the last training loss, for logging
        self.loss_chunk = LOSS_CHUNK  # label rows whose fp32 logits exist at once (memory only, not the math)
        newline = getattr(vlm.model, "image_newline", None)
        if newline is not None and hasattr(newline, "ds_id"):
            # ZeRO-3 gathers a parameter when its owner's forward runs; LlavaNext's image_newline is used in
            # get_image_features, outside LlavaNextModel.forward, so it is tied to this (root) module's forward:
            # gathered at the start of every forward on every rank, in the same order. (DeepSpeed would otherwise
            # gather it on first attribute access, wherever in the forward that falls.) The dummy grid of
            # `dummy_image` makes every rank use it, so every rank also has its gradient to reduce.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, newline)
        # A whole replica of a frozen, partitioned tower, run in its place (pretrain.model.frozen); set by the
        # trainer's set-up under ZeRO-3.
        self.frozen_tower: FrozenTower | None = None
        # The most image-text pairs a micro-batch holds (host-known, the same on every rank): the contrastive
        # gather pads to it instead of reading the ranks' counts back; None: the counts are exchanged (a sync).
        self.pair_capacity: int | None = None
        # The widths the alignment rows are padded to (the loader's, under flex_attention, which compiles a kernel
        # per shape; set by the trainer's set-up); None: each call's longest row.
        self.row_widths: tuple[int, ...] | None = None
        # Ulysses sequence parallelism (set by the engine set-up when deepspeed.sequence_parallel_size > 1): the
        # decoder runs on this rank's shard of the sequence; the vision work is split over the same group
        # (`vision_group`, pretrain.model.vision_split; None: this rank encodes all of its micro-batch's tiles).
        self.sequence_parallel: SequenceParallel | None = None
        self.vision_group = None
        # A fresh training wrapper trains: from_pretrained leaves the decoder and tower in eval mode, where
        # transformers skips activation checkpointing (GradientCheckpointingLayer recomputes only in training).
        self.train()

    # -- image and text paths ------------------------------------------------------------------------------------
    @property
    def anyres(self) -> bool:
        return hasattr(self.vlm.config, "image_grid_pinpoints")

    def image_features(self, pixel_values: torch.Tensor,
                       image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Projected image tokens of all the tiles at once (one tower call whatever the image count): (images,
        tokens per image, hidden) with one tile per image; with AnyRes (`image_sizes`, host ints, one per image),
        (all images' tokens, hidden), each image's grid unpadded with a newline per row, in image order."""
        cfg = self.vlm.config
        extra = {"image_sizes": [list(s) for s in image_sizes]} if self.anyres else {}
        with self.tower_in_place():
            out = self.vlm.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                **extra,
            )
        feats = out.pooler_output
        if isinstance(feats, list | tuple):
            feats = torch.cat(list(feats)) if self.anyres else torch.stack(list(feats))
        return feats

    @contextlib.contextmanager
    def tower_in_place(self) -> Iterator[None]:
        """The tower the vision calls inside run: the frozen replica when there is one, split across
        `vision_group` when it is set."""
        with contextlib.ExitStack() as stack:
            if self.frozen_tower:
                stack.enter_context(self.frozen_tower.swapped())
            if self.vision_group is not None:
                stack.enter_context(split_tower(self.vlm, self.vision_group))
            yield

    def visual_features(self, pixel_values: torch.Tensor | None, image_sizes: list[tuple[int, int]] | None,
                        video_pixels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(image features, clip features or None, whether the image features are a dummy image's). A video model
        (LlavaNextVideo) runs the tower once on image tiles and clip frames (pretrain.model.video), with the dummy
        image where a micro-batch has none, so every rank makes the same calls whatever its clips."""
        dummy = pixel_values is None
        if dummy:
            pixel_values, image_sizes = self.dummy_image(self.param_device())
        if not is_video_model(self.vlm):
            return self.image_features(pixel_values.to(self.dtype), image_sizes), None, dummy
        video = None if video_pixels is None else video_pixels.to(self.dtype)
        with self.tower_in_place():
            images, clips = image_and_video_features(self.vlm, pixel_values.to(self.dtype), image_sizes, video)
        return images, clips, dummy

    def dummy_image(self, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """A black tower-size image (its tiles and size) for micro-batches without one: the same module calls,
        and with AnyRes a grid, so that image_newline is used (and gets a gradient) on every rank."""
        size = self.vlm.config.vision_config.image_size
        tiles = 1
        if self.anyres:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            tiles = image_size_to_num_patches((size, size), self.vlm.config.image_grid_pinpoints, size)
        return torch.zeros(tiles, 3, size, size, dtype=self.dtype, device=device), [(size, size)]

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              features: torch.Tensor | None = None, image_sizes: list[tuple[int, int]] | None = None,
              video_pixels: torch.Tensor | None = None,
              visual: tuple[torch.Tensor, torch.Tensor | None, bool] | None = None) -> torch.Tensor:
        """Token embeddings with the image tokens replaced by image features and the video tokens by clip features
        (computed here, or given: `features` alone, or `visual` as `visual_features` returns it).

        The image path always runs before the token embedding, on a dummy image when the micro-batch has none:
        ZeRO-3 ranks must gather (forward) and reduce (backward) the same parameters in the same order, and autograd
        orders the backward by creation, so a rank that ran the tower after the embedding would diverge."""
        if visual is None:
            visual = (features, None, False) if features is not None else self.visual_features(
                pixel_values, image_sizes, video_pixels)
        features, clips, dummy = visual
        embeds = self.vlm.get_input_embeddings()(input_ids)
        if clips is not None:
            mask = (input_ids == self.vlm.config.video_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, clips.to(embeds.dtype))
        if dummy:
            return embeds + 0.0 * features.sum()
        self._check_image_tokens(features)
        mask = (input_ids == self.vlm.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    def _check_image_tokens(self, features: torch.Tensor) -> None:
        """The tower + projector must make as many tokens per image as the data expands each image to
        (`image_seq_length`; TextProcessor checks every sample against it). Shapes only: no device read. AnyRes
        counts vary per image; the processor's count and the model's unpadding agree (tests/test_anyres_parity)."""
        if self.anyres:
            return
        per_image = self.vlm.config.image_seq_length
        if features.shape[1] != per_image:
            raise ValueError(f"the vision tower and projector make {features.shape[1]} tokens per image but the "
                             f"data has {per_image} image tokens per image: the data and the model disagree")

    def decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last hidden states; without a mask, of one causal sample per row (its masks from the
        host, so transformers reads nothing back)."""
        decoder = self.vlm.model.language_model
        if attention_mask is None and position_ids is None:
            rows, width = embeds.shape[:2]
            inputs = attention_inputs(decoder.config._attn_implementation, [[width]] * rows, embeds, None,
                                      shortcut=False)
            return decoder(inputs_embeds=embeds, use_cache=False, **inputs).last_hidden_state
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False)
        return out.last_hidden_state

    def hidden_states(self, batch: dict, visual: tuple | None = None) -> torch.Tensor:
        embeds = self.embed(batch["input_ids"], batch.get("pixel_values"), None, batch.get("image_sizes"),
                            batch.get("video_pixels"), visual)
        if self.sequence_parallel is not None:  # this rank's shard of the sequence; masks from the position ids
            return decode_shard(self.vlm.model.language_model, embeds, batch["position_ids"],
                                batch["sample_lengths"], self.sequence_parallel)
        # The masks come from the host-known sample boundaries (see pretrain.model.attention).
        return decode_rows(self.vlm.model.language_model, embeds, batch.get("position_ids"), batch["sample_lengths"])

    # -- losses ---------------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (summed loss, number of label tokens) for this micro-batch: see the module docstring. The count is
        a host (CPU) tensor taken from the batch: reading it costs no device sync."""
        visual = self.visual_features(batch.get("pixel_values"), batch.get("image_sizes"), batch.get("video_pixels"))
        features = None if visual[2] else visual[0]  # the batch's own images (not the dummy), for the alignment
        hidden = self.hidden_states(batch, visual)
        index, targets, n = label_rows(batch)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        token_sum = linear_cross_entropy(self.vlm.lm_head, rows, targets, self.loss_chunk)
        count = torch.tensor(n)
        if not self.training:
            return token_sum, count
        loss, self.last_losses = training_loss(self, batch, features, token_sum, n)
        return loss, count

    # -- helpers (the alignment objectives use them too) ----------------------------------------------------------
    def param_device(self) -> torch.device:
        return self.vlm.get_input_embeddings().weight.device

    def pad_id(self) -> int:
        pad = self.vlm.config.pad_token_id
        return int(pad if pad is not None else 0)

    def pad_rows(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and the attention mask, to the smallest of `row_widths` that holds every row."""
        width = padded_width(map(len, rows), 1, self.row_widths)
        ids = torch.full((len(rows), width), self.pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(self.param_device()), mask.to(self.param_device())


def label_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(flat hidden-state rows whose next token is a label, their targets, their count): from the collate's host
    computation when the batch has it, else derived from the labels here (a device sync: hand-made batches)."""
    if "label_index" in batch:
        return batch["label_index"], batch["label_targets"], int(batch["n_labels"])
    index, targets = label_positions(batch["labels"])
    return index, targets, int(index.numel())
