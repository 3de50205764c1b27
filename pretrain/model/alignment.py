"""Image-text alignment objectives next to captioning: contrastive (InfoNCE) and image-text matching (ITM).

Contrastive (CLIP, Radford et al. 2021; as in ALBEF/BLIP's image-text contrastive loss): a pooled image feature
(mean of the projector's image tokens, i.e. the image as the decoder sees it) and a pooled text feature (mean of the
decoder's last hidden states over the text alone, without the image) are projected into a shared space and
L2-normalised; logits are similarities times a learnable scale (1 / temperature, clamped as CLIP does). Negatives are
every pair of the global batch: features are gathered across ranks with `torch.distributed.nn.functional.all_gather`,
which carries the gradient back to the rank that produced each feature (open_clip's `gather_with_grad`). Duplicate
captions need no special targets: identical texts have identical embeddings, so their logits tie and the summed
InfoNCE terms (and gradients) equal those of multi-positive targets.

ITM (ALBEF, Li et al. 2021; BLIP): the decoder reads `[bos] image tokens text` and a linear head on the hidden state
of the last token (the only one that has attended to both) classifies matched / not matched. For every image a hard
negative text, and for every text a hard negative image, is drawn from the micro-batch with probability
softmax(similarity) (positives and identical texts excluded): 1 positive and 2 negatives per pair.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import distributed
from pretrain.tokens import IGNORE

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    """The image-text pairs of a micro-batch: the single-image samples, in the order of their images."""

    texts: list[list[int]]  # label token ids of each pair's sample (what it is trained to produce)
    keys: list[int]  # a hash per text: equal texts are equal keys

    def __len__(self) -> int:
        return len(self.texts)


def batch_pairs(batch: dict, image_token_id: int) -> Pairs:
    """The samples with an image, in the order of `pixel_values`: the collate's host list (`image_texts`) when the
    batch has it, else read back from the ids (a device sync), splitting each row into its samples."""
    texts = batch.get("image_texts")
    if texts is None:
        texts = _texts_with_images(batch, image_token_id)
    return Pairs(texts, [hash(tuple(t)) for t in texts])


def _texts_with_images(batch: dict, image_token_id: int) -> list[list[int]]:
    """Split each row into its samples (`sample_lengths`, or one sample per row) and keep those with an image.
    collate() stacks `pixel_values` in the same row-major sample order, so pair i goes with image i."""
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    lengths = batch.get("sample_lengths") or [[int(n)] for n in batch["attention_mask"].sum(1).tolist()]
    texts: list[list[int]] = []
    for row_ids, row_labels, row_lengths in zip(ids, labels, lengths):
        at = 0
        for n in row_lengths:
            if image_token_id in row_ids[at : at + n]:
                texts.append([t for t in row_labels[at : at + n] if t != IGNORE])
            at += n
    return texts


class AlignmentHeads(nn.Module):
    """The extra learnable parameters of the alignment objectives; initialised from their own seeded generator so
    every rank (and every ZeRO stage) starts from the same weights without touching the global RNG."""

    def __init__(self, hidden: int, embed_dim: int, temperature_init: float, learnable_temperature: bool,
                 max_logit_scale: float, itm: bool, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed + 7)
        self.image_proj = nn.Linear(hidden, embed_dim, bias=False)
        self.text_proj = nn.Linear(hidden, embed_dim, bias=False)
        self.itm_head = nn.Linear(hidden, 2) if itm else None
        for lin in (self.image_proj, self.text_proj, self.itm_head):
            if lin is not None:
                nn.init.normal_(lin.weight, std=hidden**-0.5, generator=g)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        # Shape (1,), not a scalar: ZeRO-3 cannot partition 0-dim parameters.
        scale = torch.tensor([math.log(1.0 / temperature_init)])
        if learnable_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.max_log_scale = math.log(max_logit_scale)
        self.warned_no_pairs = False  # text-only micro-batches add nothing to the objectives: said once

    def forward(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(normalised image embeddings, normalised text embeddings, logit scale). The scale is read here, inside
        a forward, so ZeRO-3 has gathered it."""
        img = F.normalize(self.image_proj(image_pooled).float(), dim=-1)
        txt = F.normalize(self.text_proj(text_pooled).float(), dim=-1)
        return img, txt, self.logit_scale.float().clamp(max=self.max_log_scale).exp().squeeze(0)

    def match_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused).float()


def gather_with_grad(local: torch.Tensor, keys: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """All ranks' rows (ranks may hold different counts): (all rows, all keys if given, offset of this rank's rows).
    Rows are padded to the largest count for the collective and the padding dropped after; the gather is
    differentiable, so each rank's features receive the gradient of every rank's loss."""
    rank, world = distributed.rank_and_world()
    if world == 1:
        return local, keys, 0
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    # The one read back: the row counts.
    counts = [int(c) for c in distributed.to_host(torch.cat(distributed.all_gather(count)))]
    pad = max(max(counts), 1) - local.shape[0]
    rows = distributed.all_gather_with_grad(torch.cat([local, local.new_zeros(pad, local.shape[1])]) if pad else local)
    # `out` stays in the graph of the gather even when it is empty, so every rank runs its backward collective.
    out = torch.cat([r[:c] for r, c in zip(rows, counts)])
    out_keys = None
    if keys is not None:
        key_rows = distributed.all_gather(torch.cat([keys, keys.new_zeros(pad)]) if pad else keys)
        out_keys = torch.cat([k[:c] for k, c in zip(key_rows, counts)])
    return out, out_keys, sum(counts[:rank])


def gather_padded(local: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' rows without reading a count back: each rank pads its rows to `capacity` (the same, host-known
    bound on every rank), so rank r's rows sit at r x capacity; (all rows, which of them are real, this rank's
    offset). Differentiable as gather_with_grad; the mask is gathered on the device and never read."""
    n = local.shape[0]
    if n > capacity:
        raise ValueError(f"{n} image-text pairs in a micro-batch, more than the {capacity} it can hold")
    valid = torch.arange(capacity, device=local.device) < n
    rank, world = distributed.rank_and_world()
    if world == 1:
        return local, valid[:n], 0
    padded = torch.cat([local, local.new_zeros(capacity - n, local.shape[1])]) if capacity > n else local
    rows = distributed.all_gather_with_grad(padded)
    masks = distributed.all_gather(valid)
    return torch.cat(rows), torch.cat(masks), rank * capacity


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     capacity: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against the global batch; mean over this rank's pairs (0 if none).
    The positive of local pair i is global row offset + i. With `capacity` (the most pairs a micro-batch holds)
    the gather reads nothing back (gather_padded): the padding rows are masked out of every softmax, and a global
    batch of one pair gives exactly 0, as without it."""
    n = img.shape[0]
    if capacity is None:
        all_img, _, offset = gather_with_grad(img)
        all_txt, _, _ = gather_with_grad(txt)
        valid = None
        if all_img.shape[0] < 2:
            n = 0
    else:
        all_img, valid, offset = gather_padded(img, capacity)
        all_txt, _, _ = gather_padded(txt, capacity)
    if n == 0:
        return 0.0 * (all_img.sum() + all_txt.sum() + scale)
    targets = torch.arange(offset, offset + n, device=img.device)
    logits_i2t, logits_t2i = scale * img @ all_txt.T, scale * txt @ all_img.T
    if valid is not None:
        logits_i2t = logits_i2t.masked_fill(~valid, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(~valid, float("-inf"))
    return (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2


def hard_negatives(sim: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image (row of `sim`) a text index, and for each text (column) an image index, drawn with probability
    softmax(similarity) among the pairs whose text differs; -1 where every text of the micro-batch is the same.
    Device tensors: the ITM rows are built from them on the device, nothing is read back."""
    differ = keys[:, None] != keys[None, :]
    picks = []
    for s in (sim, sim.T):
        weights = torch.softmax(s.float(), dim=1) * differ
        ok = weights.sum(1) > 0
        drawn = torch.multinomial(torch.where(ok[:, None], weights, torch.ones_like(weights)), 1).squeeze(1)
        picks.append(torch.where(ok, drawn, torch.full_like(drawn, -1)))
    return picks[0], picks[1]


def itm_pairs(n: int, neg_text: torch.Tensor, neg_image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(image index, text index, label, weight) of the 3n ITM rows, on the device: the n positives, then a negative
    text for every image and a negative image for every text; a row whose draw found none (-1) has weight 0."""
    own = torch.arange(n, device=neg_text.device)
    image = torch.cat([own, own, neg_image.clamp(min=0)])
    text = torch.cat([own, neg_text.clamp(min=0), own])
    label = torch.cat([torch.ones_like(own), torch.zeros_like(own), torch.zeros_like(own)])
    weight = torch.cat([torch.ones_like(own, dtype=torch.bool), neg_text >= 0, neg_image >= 0])
    return image, text, label, weight


# -- the objectives over the training wrapper (pretrain.model.vlm.VLMForTraining, `model` below) ---------------------
def training_loss(model: nn.Module, batch: dict, features: torch.Tensor | None, token_sum: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's training loss from its caption loss (`token_sum` over its `n` label tokens): caption_weight
    x token_sum, plus each alignment objective's mean loss x its weight x n (why x n: pretrain.model.vlm); and the
    detached terms, for logging. `features`: the batch's own image features (None without images)."""
    o = model.objectives
    loss = o.caption_weight * token_sum
    terms = {"caption": token_sum.detach() / max(n, 1)}
    if model.alignment is not None:
        aligned = alignment_losses(model, batch, features)
        weights = {"contrastive": o.contrastive_weight, "itm": o.itm_weight}
        loss = loss + sum(weights[k] * v for k, v in aligned.items() if k in weights) * n
        terms.update({k: v.detach() for k, v in aligned.items()})
    return loss, terms


def alignment_losses(model: nn.Module, batch: dict, features: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Mean contrastive and ITM losses of this micro-batch's image-text pairs (and the logit scale)."""
    pairs = batch_pairs(batch, model.vlm.config.image_token_id)
    if not pairs and not model.alignment.warned_no_pairs:
        model.alignment.warned_no_pairs = True  # text-only data contributes only to the caption loss
        log.warning("objectives: contrastive/ITM need image-text samples; a micro-batch without images adds "
                    "nothing to them (warned once)")
    features = pair_features(batch, features)
    n_images = 0 if features is None else features.shape[0]
    if len(pairs) != n_images:
        raise ValueError(f"{len(pairs)} samples with image tokens but {n_images} images in the batch")
    img, txt, scale = encode_pairs(model, features, pairs.texts)
    keys = torch.tensor(pairs.keys, dtype=torch.long, device=img.device)
    out = {"contrastive": contrastive_loss(img, txt, scale, model.pair_capacity),
           "logit_scale": scale.detach()}
    if model.alignment.itm_head is not None:
        out["itm"] = itm_loss(model, features, pairs, img, txt, keys)
    return out


def encode_pairs(model: nn.Module, features: torch.Tensor | None, texts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Normalised contrastive embeddings of images (mean of their image tokens) and texts (mean of the decoder's
    hidden states over the text alone), and the logit scale."""
    hidden = model.vlm.config.text_config.hidden_size
    pooled_img = features.mean(1) if features is not None else torch.zeros(0, hidden, dtype=model.dtype,
                                                                            device=model.param_device())
    return model.alignment(pooled_img, pool_text(model, texts))


def pool_text(model: nn.Module, texts: list[list[int]]) -> torch.Tensor:
    """Mean of the decoder's last hidden states over each text, read after a bos token (where the model has
    one) as a language model expects; (texts, hidden). Runs on a dummy text when there is none."""
    cfg = model.vlm.config.text_config
    prefix = [cfg.bos_token_id] if getattr(cfg, "bos_token_id", None) is not None else []
    rows = [prefix + t for t in texts] or [prefix or [model.pad_id()]]
    ids, mask = model.pad_rows(rows)
    # Right padding under a causal mask: no real token attends to a pad, so no padding mask is passed (from
    # one, transformers reads whether it is all ones back from the device).
    hidden = model.decode(model.vlm.get_input_embeddings()(ids))
    weights = mask.clone()
    weights[:, : len(prefix)] = 0
    weights = weights.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return pooled[: len(texts)]


def itm_loss(model: nn.Module, features: torch.Tensor | None, pairs: Pairs, img: torch.Tensor, txt: torch.Tensor,
             keys: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positives and the drawn negatives. The rows are indexed on the device
    (3 per pair, a negative that found no text of its own weighted 0): their count is host-known, the draw
    is never read back."""
    if len(pairs) < 2:  # a dummy row: same modules, same collectives; its result is dropped
        return 0.0 * model.alignment.match_logits(fused_states(model, None, [], None)).sum()
    with torch.no_grad():
        neg_text, neg_image = hard_negatives(img @ txt.T, keys)
    image, text, label, weight = itm_pairs(len(pairs), neg_text, neg_image)
    logits = model.alignment.match_logits(fused_states(model, features[image], pairs.texts, text))
    weight = weight.to(logits.dtype)
    return (F.cross_entropy(logits, label, reduction="none") * weight).sum() / weight.sum()


def fused_states(model: nn.Module, feats: torch.Tensor | None, texts: list[list[int]],
                 text_index: torch.Tensor | None) -> torch.Tensor:
    """Last-token hidden states of `[bos] image tokens text` for each row's image features (`feats`, one per
    row) and text (`text_index` into `texts`, a device tensor); (rows, hidden). Texts are right-padded, so
    each row's last real token is found from its host-known length, indexed on the device."""
    cfg = model.vlm.config
    prefix = [cfg.text_config.bos_token_id] if getattr(cfg.text_config, "bos_token_id", None) is not None else []
    n_tokens = cfg.image_seq_length
    head = len(prefix) + n_tokens
    if feats is None:
        feats = torch.zeros(1, n_tokens, cfg.text_config.hidden_size, dtype=model.dtype, device=model.param_device())
        texts, text_index = [[model.pad_id()]], torch.zeros(1, dtype=torch.long, device=model.param_device())
    body, body_mask = model.pad_rows(texts)
    rows = text_index.shape[0]
    start = torch.tensor(prefix + [cfg.image_token_id] * n_tokens, dtype=torch.long, device=body.device)
    ids = torch.cat([start.expand(rows, head), body[text_index]], dim=1)
    hidden = model.decode(model.embed(ids, None, feats))  # right-padded, causal: no padding mask (pool_text)
    last = head + body_mask.sum(1)[text_index] - 1
    return hidden[torch.arange(rows, device=hidden.device), last]


def pair_features(batch: dict, features: torch.Tensor | None) -> torch.Tensor | None:
    """The image features of the alignment pairs: only single-image samples pair up (a text that follows several
    images describes none of them alone), at the host-known `image_pair_index` when the batch has it."""
    index = batch.get("image_pair_index")
    if index is None or features is None:
        return features
    return features.index_select(0, torch.tensor(index, dtype=torch.long, device=features.device))
