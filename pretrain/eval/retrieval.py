"""Image-text similarity for retrieval: from the contrastive heads when the run trained them, otherwise from the
captioning model itself.

Likelihood retrieval (no contrastive heads): the similarity of image i and text j is the mean per-token
log-likelihood of text j given image i in the pretraining caption format (`[bos] <image>*N text eos`), i.e. how
well the captioner would "explain" the image with that text. Length-normalised, so image->text ranking does not
simply prefer short texts. It costs N_images x N_texts sequences (the decoder reruns for every pair; the vision
tower runs once per image), so evaluation caps the number of retrieval samples.
"""

from __future__ import annotations

import torch

from pretrain.model.alignment import pool_text
from pretrain.model.vlm import VLMForTraining


@torch.no_grad()
def image_features(module: VLMForTraining, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Projected image tokens of every image, (images, tokens, hidden), computed in chunks."""
    device, dtype = module.param_device(), module.dtype
    return torch.cat([module.image_features(pixel_values[i : i + batch_size].to(device, dtype))
                      for i in range(0, len(pixel_values), batch_size)])


@torch.no_grad()
def contrastive_similarity(module: VLMForTraining, features: torch.Tensor, texts: list[list[int]],
                           batch_size: int = 64) -> torch.Tensor:
    """Cosine similarity of the contrastive embeddings, (images, texts)."""
    if module.alignment is None:
        raise ValueError("the model has no contrastive heads (objectives.contrastive_weight was 0)")
    empty = torch.zeros(0, features.shape[-1], dtype=features.dtype, device=features.device)
    img = torch.cat([module.alignment(features[i : i + batch_size].mean(1), empty)[0]
                     for i in range(0, len(features), batch_size)])
    txt = torch.cat([module.alignment(empty, pool_text(module, texts[i : i + batch_size]))[1]
                     for i in range(0, len(texts), batch_size)])
    return (img @ txt.T).float().cpu()


@torch.no_grad()
def likelihood_similarity(module: VLMForTraining, features: torch.Tensor, texts: list[list[int]],
                          prompt: list[int], batch_size: int = 64) -> torch.Tensor:
    """Mean log-likelihood of each text given each image, (images, texts). `prompt` is the caption prompt
    (`[bos] <image>*N`), `texts` the caption token ids with eos."""
    rows = [prompt + t for t in texts]
    ids, mask = module.pad_rows(rows)
    targets = torch.full_like(ids, -100)
    for j, t in enumerate(texts):
        targets[j, len(prompt) : len(prompt) + len(t)] = torch.tensor(t)
    targets = targets[:, 1:]
    counts = (targets != -100).sum(1).clamp(min=1)
    sim = torch.empty(len(features), len(texts))
    for i in range(len(features)):
        for start in range(0, len(texts), batch_size):
            sl = slice(start, start + batch_size)
            n = ids[sl].shape[0]
            embeds = module.embed(ids[sl], None, features[i : i + 1].expand(n, -1, -1))
            hidden = module.decode(embeds, mask[sl])[:, :-1]
            tgt = targets[sl]
            keep = tgt != -100  # logits only where a text token is predicted (large vocabularies)
            logp = torch.log_softmax(module.vlm.lm_head(hidden[keep]).float(), dim=-1)
            tok = logp.gather(-1, tgt[keep].unsqueeze(-1)).squeeze(-1)
            rows_of = torch.arange(n, device=tgt.device).unsqueeze(1).expand_as(tgt)[keep]
            total = torch.zeros(n, device=tok.device).index_add_(0, rows_of, tok)
            sim[i, sl] = (total / counts[sl]).cpu()
    return sim
