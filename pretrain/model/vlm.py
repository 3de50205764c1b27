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

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from pretrain.config import ObjectivesConfig
from pretrain.data.batching import label_positions
from pretrain.data.text import IGNORE
from pretrain.model.alignment import AlignmentHeads, Pairs, batch_pairs, contrastive_loss, hard_negatives, itm_pairs
from pretrain.model.attention import decode_rows
from pretrain.model.loss import LOSS_CHUNK, linear_cross_entropy

log = logging.getLogger(__name__)
# The test switch that breaks the image path (features zeroed), so tests can prove they detect it; the same JSON
# variable as the trainer's fault injection (pretrain.train.faults), empty in any real run.
FAULTS_ENV = "PRETRAIN_TEST_FAULTS"


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
        faults = json.loads(os.environ.get(FAULTS_ENV, "") or "{}")
        self.zero_image_features = bool(faults.get("zero_image_features"))
        self._warned_no_pairs = False
        self.loss_chunk = LOSS_CHUNK  # label rows whose fp32 logits exist at once (memory only, not the math)

    # -- image and text paths ------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens, (images, tokens per image, hidden)."""
        cfg = self.vlm.config
        out = self.vlm.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = out.pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, list | tuple) else feats
        return feats * 0.0 if self.zero_image_features else feats

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image tokens replaced by image features (computed here, or given).

        The image path always runs before the token embedding, on a dummy image when the micro-batch has none:
        ZeRO-3 ranks must gather (forward) and reduce (backward) the same parameters in the same order, and autograd
        orders the backward by creation, so a rank that ran the tower after the embedding would diverge."""
        dummy = features is None and pixel_values is None
        if dummy:
            size = self.vlm.config.vision_config.image_size
            pixel_values = torch.zeros(1, 3, size, size, dtype=self.dtype, device=input_ids.device)
        if features is None:
            features = self.image_features(pixel_values.to(self.dtype))
        embeds = self.vlm.get_input_embeddings()(input_ids)
        if dummy:
            return embeds + 0.0 * features.sum()
        self._check_image_tokens(features)
        mask = (input_ids == self.vlm.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    def _check_image_tokens(self, features: torch.Tensor) -> None:
        """The tower + projector must make as many tokens per image as the data expands each image to
        (`image_seq_length`; TextProcessor checks every sample against it). Shapes only: no device read."""
        per_image = self.vlm.config.image_seq_length
        if features.shape[1] != per_image:
            raise ValueError(f"the vision tower and projector make {features.shape[1]} tokens per image but the "
                             f"data has {per_image} image tokens per image: the data and the model disagree")

    def decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last hidden states."""
        out = self.vlm.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                            position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def hidden_states(self, batch: dict, features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.embed(batch["input_ids"], batch.get("pixel_values"), features)
        # The masks come from the host-known sample boundaries (see pretrain.model.attention).
        return decode_rows(self.vlm.model.language_model, embeds, batch.get("attention_mask"),
                           batch.get("position_ids"), packed=batch.get("packed", False),
                           sample_lengths=batch.get("sample_lengths"))

    # -- losses ---------------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (summed loss, number of label tokens) for this micro-batch: see the module docstring. The count is
        a host (CPU) tensor taken from the batch: reading it costs no device sync."""
        pixel_values = batch.get("pixel_values")
        features = None if pixel_values is None else self.image_features(pixel_values.to(self.dtype))
        hidden = self.hidden_states(batch, features)
        index, targets, n = label_rows(batch)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        token_sum = linear_cross_entropy(self.vlm.lm_head, rows, targets, self.loss_chunk)
        count = torch.tensor(n)
        if not self.training:
            return token_sum, count
        o = self.objectives
        loss = o.caption_weight * token_sum
        parts = {"caption": token_sum.detach() / max(n, 1)}
        if self.alignment is not None:
            aligned = self.alignment_losses(batch, features)
            weights = {"contrastive": o.contrastive_weight, "itm": o.itm_weight}
            loss = loss + sum(weights[k] * v for k, v in aligned.items() if k in weights) * n
            parts.update({k: v.detach() for k, v in aligned.items()})
        self.last_losses = parts
        return loss, count

    def alignment_losses(self, batch: dict, features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Mean contrastive and ITM losses of this micro-batch's image-text pairs (and the logit scale)."""
        pairs = batch_pairs(batch, self.vlm.config.image_token_id)
        if not pairs and not self._warned_no_pairs:
            self._warned_no_pairs = True  # text-only data contributes only to the caption loss
            log.warning("objectives: contrastive/ITM need image-text samples; a micro-batch without images adds "
                        "nothing to them (warned once)")
        n_images = 0 if features is None else features.shape[0]
        if len(pairs) != n_images:
            raise ValueError(f"{len(pairs)} samples with image tokens but {n_images} images in the batch")
        img, txt, scale = self.encode_pairs(features, pairs.texts)
        keys = torch.tensor(pairs.keys, dtype=torch.long, device=img.device)
        out = {"contrastive": contrastive_loss(img, txt, scale), "logit_scale": scale.detach()}
        if self.alignment.itm_head is not None:
            out["itm"] = self.itm_loss(features, pairs, img, txt, keys)
        return out

    def encode_pairs(self, features: torch.Tensor | None, texts: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """Normalised contrastive embeddings of images (mean of their image tokens) and texts (mean of the decoder's
        hidden states over the text alone), and the logit scale."""
        hidden = self.vlm.config.text_config.hidden_size
        pooled_img = features.mean(1) if features is not None else torch.zeros(0, hidden, dtype=self.dtype,
                                                                                device=self._device())
        return self.alignment(pooled_img, self.pool_text(texts))

    def pool_text(self, texts: list[list[int]]) -> torch.Tensor:
        """Mean of the decoder's last hidden states over each text, read after a bos token (where the model has
        one) as a language model expects; (texts, hidden). Runs on a dummy text when there is none."""
        cfg = self.vlm.config.text_config
        prefix = [cfg.bos_token_id] if getattr(cfg, "bos_token_id", None) is not None else []
        rows = [prefix + t for t in texts] or [prefix or [self._pad_id()]]
        ids, mask = self._pad(rows)
        hidden = self.decode(self.vlm.get_input_embeddings()(ids), mask)
        weights = mask.clone()
        weights[:, : len(prefix)] = 0
        weights = weights.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return pooled[: len(texts)]

    def itm_loss(self, features: torch.Tensor | None, pairs: Pairs, img: torch.Tensor, txt: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:
        rows, labels = [], []
        if len(pairs) >= 2:
            with torch.no_grad():
                neg_text, neg_image = hard_negatives(img @ txt.T, keys)
            rows, labels = itm_pairs(len(pairs), neg_text, neg_image)
        logits = self.alignment.match_logits(self.fused_states(features, pairs.texts, rows))
        if not rows:
            return 0.0 * logits.sum()
        return F.cross_entropy(logits, torch.tensor(labels, device=logits.device))

    def fused_states(self, features: torch.Tensor | None, texts: list[list[int]],
                     rows: list[tuple[int, int]]) -> torch.Tensor:
        """Last-token hidden states of `[bos] image tokens text` for (image, text) index pairs; (rows, hidden)."""
        cfg = self.vlm.config
        prefix = [cfg.text_config.bos_token_id] if getattr(cfg.text_config, "bos_token_id", None) is not None else []
        n_tokens = cfg.image_seq_length
        if rows:
            ids, mask = self._pad([prefix + [cfg.image_token_id] * n_tokens + texts[t] for _, t in rows])
            feats = features[[i for i, _ in rows]]
        else:  # dummy row: same modules, same collectives; its result is dropped
            ids, mask = self._pad([prefix + [cfg.image_token_id] * n_tokens + [self._pad_id()]])
            feats = torch.zeros(1, n_tokens, cfg.text_config.hidden_size, dtype=self.dtype, device=ids.device)
        hidden = self.decode(self.embed(ids, None, feats), mask)
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last][: len(rows)]

    def per_token_loss(self, batch: dict) -> torch.Tensor:
        """Loss of every next-token prediction (IGNORE positions 0), shape (B, T-1): for tests and evaluation."""
        hidden = self.hidden_states(batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        logits = self.vlm.lm_head(hidden).float()
        loss = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        return loss * (targets != IGNORE)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.vlm.get_input_embeddings().weight.device

    def _pad_id(self) -> int:
        pad = self.vlm.config.pad_token_id
        return int(pad if pad is not None else 0)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and the attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(self._device()), mask.to(self._device())


def label_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(flat hidden-state rows whose next token is a label, their targets, their count): from the collate's host
    computation when the batch has it, else derived from the labels here (a device sync: hand-made batches)."""
    if "label_index" in batch:
        return batch["label_index"], batch["label_targets"], int(batch["n_labels"])
    index, targets = label_positions(batch["labels"])
    return index, targets, int(index.numel())
