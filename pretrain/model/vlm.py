"""The training forward: LlavaForConditionalGeneration in, summed next-token loss and label count out.

Why not `model(**batch).loss`: (1) the loss must be averaged over the label tokens of the whole global batch, so we
return a sum and let the trainer divide; (2) logits are computed only at label positions, in chunks, so a large
vocabulary never materialises fp32 logits for every token; (3) a micro-batch without images still runs the vision
tower on a dummy image (its output multiplied by zero), so under ZeRO-3 every rank runs the same collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from pretrain.data.text import IGNORE

LOGIT_CHUNK = 4096  # label positions per lm-head chunk


class VLMForTraining(nn.Module):
    def __init__(self, vlm: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.vlm = vlm

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.vlm.config
        out = self.vlm.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = out.pooler_output
        return torch.cat(list(feats), dim=0) if isinstance(feats, list | tuple) else feats.flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.vlm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            size = self.vlm.config.vision_config.image_size
            dummy = torch.zeros(1, 3, size, size, dtype=embeds.dtype, device=embeds.device)
            return embeds + 0.0 * self.image_embeddings(dummy).sum()
        feats = self.image_embeddings(pixel_values.to(embeds.dtype))
        mask = (input_ids == self.vlm.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if mask.sum() != feats.numel():
            raise ValueError(f"{int(mask.sum()) // embeds.shape[-1]} image tokens for {feats.shape[0]} image "
                             "features: the data and the model disagree on image tokens per image")
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    def hidden_states(self, batch: dict) -> torch.Tensor:
        embeds = self.embed(batch["input_ids"], batch.get("pixel_values"))
        packed = batch.get("packed", False)
        out = self.vlm.model.language_model(
            inputs_embeds=embeds,
            # Packed rows: no mask, so transformers builds the per-sample causal mask from restarting positions.
            attention_mask=None if packed else batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sum of token losses, number of label tokens) for this micro-batch."""
        hidden = self.hidden_states(batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        return chunked_cross_entropy(self.vlm.lm_head, hidden[keep], targets[keep]), keep.sum()

    def per_token_loss(self, batch: dict) -> torch.Tensor:
        """Loss of every next-token prediction (IGNORE positions 0), shape (B, T-1): for tests and evaluation."""
        hidden = self.hidden_states(batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        logits = self.vlm.lm_head(hidden).float()
        loss = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        return loss * (targets != IGNORE)


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Sum of cross-entropy over rows, fp32 logits for at most `chunk` rows at a time."""
    if hidden.shape[0] == 0:
        # Still touch the head so every rank runs the same ZeRO-3 gathers.
        return head(hidden[:0]).float().sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total
