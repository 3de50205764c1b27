"""The alignment objectives in one process (and the cross-rank gather in two): pairs, losses, gradients, the loss
normalisation contract with the trainer, the image-path fault (tests/helpers/faults.py), and
config validation."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers.faults import install

from pretrain.config import ConfigError, ObjectivesConfig, build_config
from pretrain.data.batching import collate
from pretrain.data.sample import ProcessedSample
from pretrain.model.alignment import batch_pairs, contrastive_loss, gather_with_grad, hard_negatives, itm_pairs
from pretrain.ports import free_port

IMG = 7  # image token id in the hand-made batches


def _sample(text: list[int], image: bool) -> ProcessedSample:
    prompt = [1] + ([IMG] * 2 if image else [])
    return ProcessedSample(prompt + text, [-100] * len(prompt) + text,
                           torch.full((3, 4, 4), float(text[0])) if image else None)


def test_batch_pairs_follow_pixel_order_in_padded_and_packed_rows():
    a, b, c = _sample([10, 11, 2], True), _sample([12, 2], False), _sample([13, 14, 15, 2], True)
    padded = collate([[a], [b], [c]], pad_id=0)
    packed = collate([[a, b], [c]], pad_id=0)
    for batch in (padded, packed):
        # The collate's host list and the ids read back (a batch without it) agree.
        read_back = batch_pairs({k: v for k, v in batch.items() if k != "image_texts"}, IMG)
        pairs = batch_pairs(batch, IMG)
        assert pairs.texts == read_back.texts == [[10, 11, 2], [13, 14, 15, 2]]
        assert batch["pixel_values"][:, 0, 0, 0].tolist() == [10.0, 13.0]  # image i goes with pair i
        assert pairs.keys[0] == hash((10, 11, 2)) and pairs.keys[0] != pairs.keys[1]


def test_contrastive_loss_is_symmetric_infonce():
    eye = torch.eye(3)
    assert contrastive_loss(eye, eye, torch.tensor(100.0)).item() < 1e-3
    torch.manual_seed(0)
    img, txt, scale = torch.randn(4, 5), torch.randn(4, 5), torch.tensor(2.0)
    want = (torch.nn.functional.cross_entropy(scale * img @ txt.T, torch.arange(4))
            + torch.nn.functional.cross_entropy(scale * txt @ img.T, torch.arange(4))) / 2
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(want.item(), rel=1e-6)
    # No pair: zero, still differentiable.
    empty = torch.zeros(0, 3, requires_grad=True)
    out = contrastive_loss(empty, empty, scale)
    out.backward()
    assert out.item() == 0.0 and empty.grad is not None


def test_hard_negatives_never_pick_the_same_text():
    torch.manual_seed(0)
    keys = torch.tensor([1, 1, 2, 3])
    sim = torch.randn(4, 4) * 10
    for _ in range(20):
        neg_text, neg_image = hard_negatives(sim, keys)
        assert all(keys[i] != keys[t] for i, t in enumerate(neg_text))
        assert all(keys[t] != keys[j] for t, j in enumerate(neg_image))
    assert [t.tolist() for t in hard_negatives(sim[:2, :2], torch.tensor([4, 4]))] == [[-1, -1], [-1, -1]]
    image, text, label, weight = itm_pairs(2, torch.tensor([1, -1]), torch.tensor([-1, 0]))
    rows = [(i, t) for i, t, w in zip(image.tolist(), text.tolist(), weight.tolist()) if w]
    assert rows == [(0, 0), (1, 1), (0, 1), (0, 1)] and label[weight].tolist() == [1, 1, 0, 0]


@pytest.fixture(scope="module")
def parts(assets, tokenizer, shapes):
    """A tiny Llava model and a real micro-batch of synthetic samples through the training preprocessing."""
    from transformers import AutoImageProcessor

    from pretrain.config import ModelConfig
    from pretrain.data.image import ImageTransform
    from pretrain.data.loader import LoaderSpec, ResumableLoader
    from pretrain.data.sample import SampleProcessor
    from pretrain.data.text import TextProcessor
    from pretrain.data.urls import expand_urls
    from pretrain.model.build import build_model, load_tokenizer

    mcfg = ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"]))
    tok = load_tokenizer(mcfg)
    vlm = build_model(mcfg, tok)
    text = TextProcessor(tok, vlm.config.image_token_id, vlm.config.image_seq_length, 64)
    proc = SampleProcessor(text, ImageTransform.from_processor(AutoImageProcessor.from_pretrained(assets["clip"])),
                           10**8)
    spec = LoaderSpec(sources=[expand_urls(shapes["val"]["urls"])], weights=[1.0], rows_per_batch=6, max_length=64,
                      pad_id=tok.pad_token_id, shuffle=False)
    return vlm, next(iter(ResumableLoader(spec, proc)))


def test_forward_adds_weighted_alignment_losses_scaled_by_label_count(parts):
    from pretrain.model.vlm import VLMForTraining

    vlm, batch = parts
    plain = VLMForTraining(vlm).train()
    token_sum, n = plain(batch)
    objectives = ObjectivesConfig(caption_weight=0.5, contrastive_weight=0.3, itm_weight=0.2)
    module = VLMForTraining(vlm, objectives).train()
    loss, n2 = module(batch)
    p = module.last_losses
    assert int(n2) == int(n) and set(p) >= {"caption", "contrastive", "itm", "logit_scale"}
    want = 0.5 * token_sum + (0.3 * p["contrastive"] + 0.2 * p["itm"]) * n
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert p["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-4)
    loss.backward()
    for name, param in module.alignment.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Validation (eval mode) reports the language-model loss alone, whatever the objectives.
    module.eval()
    assert module(batch)[0].item() == pytest.approx(plain.eval()(batch)[0].item(), rel=1e-6)


def _two_pairs(batch: dict) -> dict:
    """The first two samples of `batch` whose captions differ, as a micro-batch of their own."""
    labels = [tuple(t for t in row.tolist() if t != -100) for row in batch["labels"]]
    j = next(j for j in range(1, len(labels)) if labels[j] != labels[0])
    pick = [0, j]
    sub = {k: batch[k][pick] for k in ("input_ids", "labels", "position_ids", "attention_mask", "pixel_values")}
    return {**sub, "sample_lengths": [batch["sample_lengths"][i] for i in pick], "n_samples": 2, "packed": False}


def test_itm_loss_equals_an_independent_computation(parts):
    """With two pairs of different captions the hard negatives are forced (each image's only other text, each
    text's only other image), so the ITM loss has one value: cross-entropy of the match head on the final hidden
    state of `[bos] <image tokens> caption`, here computed through transformers' own LlavaModel forward (its image
    token merge, not ours) for the 6 rows: 2 matched (label 1), 4 swapped (label 0)."""
    from pretrain.model.vlm import VLMForTraining

    vlm, batch = parts
    two = _two_pairs(batch)
    module = VLMForTraining(vlm, ObjectivesConfig(caption_weight=1.0, contrastive_weight=0.5, itm_weight=0.5)).train()
    module(two)
    got = module.last_losses["itm"].item()
    cfg = vlm.config
    texts = [[t for t in row.tolist() if t != -100] for row in two["labels"]]
    rows = [(0, 0), (1, 1), (0, 1), (1, 0), (1, 0), (0, 1)]  # positives, each image's negative, each text's
    with torch.no_grad():
        finals = []
        for image, text in rows:
            ids = [cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.image_seq_length + texts[text]
            out = vlm.model(input_ids=torch.tensor([ids]), pixel_values=two["pixel_values"][image : image + 1])
            finals.append(out.last_hidden_state[0, -1])
        logits = module.alignment.itm_head(torch.stack(finals)).float()
        want = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0])).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert abs(want - math.log(2)) > 1e-4  # the head is not at chance: the value is informative


def test_align_stage_projector_learns_from_contrastive_alone(parts):
    from pretrain.model.stages import apply_stage
    from pretrain.model.vlm import VLMForTraining

    vlm, batch = parts
    apply_stage(vlm, "align")
    try:
        module = VLMForTraining(vlm, ObjectivesConfig(caption_weight=0.0, contrastive_weight=1.0)).train()
        module(batch)[0].backward()
        grads = [p.grad for p in vlm.model.multi_modal_projector.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        apply_stage(vlm, "full")
        vlm.zero_grad(set_to_none=True)


def test_zero_image_features_fault_breaks_the_image_path(parts, monkeypatch):
    from pretrain.model.vlm import VLMForTraining

    vlm, batch = parts
    px = batch["pixel_values"]
    assert VLMForTraining(vlm).image_features(px).abs().sum() > 0
    install({"zero_image_features": True}, monkeypatch.setattr)
    assert VLMForTraining(vlm).image_features(px).abs().sum() == 0


def test_objectives_config_validation():
    base = {"model": {"llm": "x", "vision": "y"}, "data": {"train": [{"urls": "a.tar"}]},
            "train": {"max_steps": 1, "micro_batch_size": 1}}
    assert build_config(base).objectives.caption_weight == 1.0
    with pytest.raises(ConfigError, match="nothing to train"):
        build_config({**base, "objectives": {"caption_weight": 0}})
    with pytest.raises(ConfigError, match="micro_batch_size >= 2"):
        build_config({**base, "objectives": {"itm_weight": 1.0}})
    with pytest.raises(ConfigError, match="objectives.temprature_init: unknown key"):
        build_config({**base, "objectives": {"temprature_init": 0.1}})
    ok = build_config({**base, "objectives": {"contrastive_weight": 1.0}})
    assert ok.objectives.alignment


CASES = [[3, 3], [3, 1], [2, 0]]  # pairs per rank: equal, unequal, a rank without pairs


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for case, counts in enumerate(CASES):
        img_all, txt_all = _features(case, counts)
        lo = sum(counts[:rank])
        img = img_all[lo : lo + counts[rank]].clone().requires_grad_(True)
        txt = txt_all[lo : lo + counts[rank]].clone().requires_grad_(True)
        contrastive_loss(img, txt, torch.tensor(3.0)).backward()
        rows, all_keys, offset = gather_with_grad(img.detach(), torch.arange(lo, lo + counts[rank]))
        # The padded gather (no count read back) gives the same loss and gradients; 3 is a full micro-batch.
        img_p, txt_p = (t.detach().clone().requires_grad_(True) for t in (img, txt))
        contrastive_loss(img_p, txt_p, torch.tensor(3.0), capacity=3).backward()
        # Plain lists: tensors sent through a queue do not outlive the sending process.
        queue.put((case, rank, img.grad.tolist(), txt.grad.tolist(), rows.tolist(), offset, all_keys.tolist(),
                   img_p.grad.tolist(), txt_p.grad.tolist()))
    dist.barrier()
    dist.destroy_process_group()


def _features(case: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case)
    return torch.randn(sum(counts), 8, generator=g), torch.randn(sum(counts), 8, generator=g)


@pytest.mark.slow
def test_cross_rank_gather_gives_the_global_gradient():
    """Each rank's loss is the mean over its own pairs against the gathered global batch. After backward, each rank's
    features must hold the gradient of the SUM of all ranks' losses (the gather's backward brings the other ranks'
    terms home); DeepSpeed's average over ranks then divides by the world size. Ranks may hold unequal counts."""
    port = free_port()
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_gather_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    got = sorted(queue.get(timeout=60) for _ in range(2 * len(CASES)))
    for case, counts in enumerate(CASES):
        img_all, txt_all = (t.requires_grad_(True) for t in _features(case, counts))
        sum(_local_loss(img_all, txt_all, lo, c) for lo, c in _spans(counts)).backward()
        mine = [g for g in got if g[0] == case]
        assert torch.tensor(mine[0][4]).equal(img_all.detach()) and [g[5] for g in mine] == [0, counts[0]]
        assert mine[1][6] == list(range(sum(counts)))
        for (_, rank, gi, gt, *_, pi, pt), (lo, c) in zip(mine, _spans(counts)):
            if c:
                for grads in ((gi, gt), (pi, pt)):  # counts exchanged, and padded to the capacity
                    assert torch.allclose(torch.tensor(grads[0]), img_all.grad[lo : lo + c], atol=1e-6), (case, rank)
                    assert torch.allclose(torch.tensor(grads[1]), txt_all.grad[lo : lo + c], atol=1e-6), (case, rank)


def _spans(counts: list[int]) -> list[tuple[int, int]]:
    return [(sum(counts[:r]), c) for r, c in enumerate(counts)]


def _local_loss(img_all, txt_all, lo, c):
    """One rank's contrastive loss written out on the full batch: its rows against all rows."""
    if c == 0:
        return img_all.sum() * 0
    targets = torch.arange(lo, lo + c)
    li = torch.nn.functional.cross_entropy(3.0 * img_all[lo : lo + c] @ txt_all.T, targets)
    lt = torch.nn.functional.cross_entropy(3.0 * txt_all[lo : lo + c] @ img_all.T, targets)
    return (li + lt) / 2
