"""Loss-based validation: loss, perplexity, the image-ablation gap and in-batch retrieval. Runs inside training (a
DeepSpeed engine, every rank, every ZeRO stage) and in `pretrain eval` (a plain VLMForTraining in one process).

Image-ablation gap: the validation loss again with each micro-batch's images rolled by one place (every sample gets
another sample's image), minus the loss with the true images. A model that reads the images pays for the wrong
ones; a model that learned only the text priors loses nothing. (A micro-batch with a single image cannot shuffle and
adds no gap.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pretrain.eval.metrics import retrieval_metrics
from pretrain.model.alignment import batch_pairs, gather_with_grad
from pretrain.model.vlm import VLMForTraining, pair_features
from pretrain.train import dist


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shuffled_images(batch: dict) -> dict:
    """The batch with its images rolled by one place (unchanged when it has fewer than two)."""
    px = batch.get("pixel_values")
    if px is None or px.shape[0] < 2 or any(t != 1 for t in batch.get("image_tiles") or []):
        return batch  # tiled images differ in token counts, so they cannot swap places
    return {**batch, "pixel_values": px.roll(1, dims=0)}


@torch.no_grad()
def validation_metrics(model, batches: Iterable[dict], device: torch.device | None = None, *,
                       image_ablation: bool = True, retrieval: bool = True) -> dict[str, float]:
    """Metrics over `batches` (this rank's share; every rank must call this with the same number of batches).

    `model`: a DeepSpeed engine wrapping VLMForTraining, or a VLMForTraining. Returns `loss`, `perplexity`,
    `batches`, and with `image_ablation` `loss_shuffled_images` and `image_gap`; with `retrieval` and contrastive
    heads, image<->text Recall@1/5/10 over all ranks' validation pairs (`retrieval_i2t_r1`, ...). Loss is the mean
    over label tokens of all ranks. The model is put back in the mode it was in."""
    module: VLMForTraining = getattr(model, "module", model)
    device = device or getattr(model, "device", None) or module._device()
    was_training = module.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, label count, loss sum with shuffled images
    img, txt, keys, n_batches = [], [], [], 0
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            loss, n = model(batch)
            totals[0] += float(loss)
            totals[1] += float(n)
            if image_ablation:
                totals[2] += float(model(shuffled_images(batch))[0])
            if retrieval and module.alignment is not None:
                px = batch.get("pixel_values")
                feats = pair_features(batch, None if px is None else module.image_features(px.to(module.dtype)))
                pairs = batch_pairs(batch, module.vlm.config.image_token_id)
                i, t, _ = module.encode_pairs(feats, pairs.texts)
                img.append(i)
                txt.append(t)
                keys += pairs.keys
            n_batches += 1
    finally:
        model.train(was_training)
    totals = torch.tensor(dist.all_reduce_values(totals.tolist()), dtype=torch.float64)
    loss = totals[0].item() / max(totals[1].item(), 1.0)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": n_batches}
    if image_ablation:
        out["loss_shuffled_images"] = totals[2].item() / max(totals[1].item(), 1.0)
        out["image_gap"] = out["loss_shuffled_images"] - loss
    if retrieval and module.alignment is not None and img:
        out.update(_retrieval(torch.cat(img), torch.cat(txt), torch.tensor(keys, dtype=torch.long, device=device)))
    return out


def _retrieval(img: torch.Tensor, txt: torch.Tensor, keys: torch.Tensor) -> dict[str, float]:
    all_img, all_keys, _ = gather_with_grad(img, keys)
    all_txt, _, _ = gather_with_grad(txt)
    if all_img.shape[0] < 2:
        return {}
    sim = (all_img @ all_txt.T).float().cpu()
    key_list = all_keys.tolist()
    return {f"retrieval_{k}": v for k, v in retrieval_metrics(sim, key_list, key_list).items()}
