"""`pretrain eval`: one checkpoint, the first N validation samples, every metric the data supports, one JSON object.

- loss / perplexity / image-ablation gap: the training preprocessing of the same samples, through the training-time
  validation loop (pretrain.train.validation);
- captioning (samples with a caption): greedy captions in the pretraining format, BLEU-4 and CIDEr-D against the
  reference caption, and for the synthetic shapes set the attribute accuracy of the generated captions;
- VQA (samples with `qa` pairs): greedy answers to each question in the chat format, exact match;
- retrieval (samples with a caption): Recall@1/5/10 both ways, by contrastive similarity when the run trained the
  heads, otherwise by caption likelihood (retrieval.py); `method` says which.
Metrics with no data, or not asked for (`tasks`), are null.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config
from pretrain.data.batching import collate
from pretrain.data.errors import SampleError
from pretrain.eval import scores as M
from pretrain.eval.greedy import caption_prompt, greedy_generate, question_prompt, stop_ids
from pretrain.eval.loading import EvalModel, load_eval_model
from pretrain.eval.retrieval import contrastive_similarity, image_features, likelihood_similarity
from pretrain.eval.samples import EvalSample, read_eval_samples
from pretrain.train.validation import validation_metrics

log = logging.getLogger(__name__)


TASKS = ("loss", "captioning", "vqa", "retrieval")


@dataclass
class EvalOptions:
    samples: int = 200  # validation samples evaluated (the first N, in shard order)
    retrieval_samples: int = 100  # likelihood retrieval costs N^2 decoder passes
    retrieval: str = "auto"  # auto | contrastive | likelihood
    batch_size: int = 32
    max_new_tokens: int = 32
    device: str | None = None
    tasks: tuple[str, ...] = TASKS


def _batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def loss_metrics(em: EvalModel, samples: list[EvalSample], batch_size: int) -> dict[str, float]:
    processed = []
    for s in samples:
        try:
            processed.append(em.processor(s.parts))
        except SampleError:
            continue
    pad = em.tokenizer.pad_token_id
    batches = (collate([[p] for p in chunk], pad) for chunk in _batched(processed, batch_size))
    return validation_metrics(em.module, batches, em.device, image_ablation=True)


def generate_texts(em: EvalModel, images: list, prompts: list[list[int]], opts: EvalOptions) -> list[str]:
    out = []
    for chunk in _batched(list(zip(images, prompts)), opts.batch_size):
        px = torch.stack([em.transform(img) for img, _ in chunk])
        ids = greedy_generate(em.module, [p for _, p in chunk], px, stop_ids(em.tokenizer), opts.max_new_tokens)
        out += [em.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    return out


def caption_metrics(em: EvalModel, samples: list[EvalSample], opts: EvalOptions) -> dict[str, Any] | None:
    samples = [s for s in samples if s.caption]
    if not samples:
        return None
    cfg = em.module.vlm.config
    prompt = caption_prompt(em.tokenizer, cfg.image_token_id, cfg.image_seq_length)
    texts = generate_texts(em, [s.image for s in samples], [prompt] * len(samples), opts)
    refs = [[s.caption] for s in samples]
    out: dict[str, Any] = {"n": len(samples), "bleu4": M.bleu4(texts, refs), "cider": M.cider_d(texts, refs)[0],
                           "examples": [{"generated": t, "reference": s.caption} for t, s in zip(texts[:5], samples)]}
    if all(s.attributes for s in samples):
        out["attributes"] = M.attribute_accuracy(texts, [s.attributes for s in samples])
    return out


def vqa_metrics(em: EvalModel, samples: list[EvalSample], opts: EvalOptions) -> dict[str, Any] | None:
    items = [(s, qa) for s in samples for qa in s.qa]
    if not items:
        return None
    cfg = em.module.vlm.config
    prompts = [question_prompt(em.tokenizer, cfg.image_token_id, cfg.image_seq_length, qa["question"])
               for _, qa in items]
    answers = generate_texts(em, [s.image for s, _ in items], prompts, opts)
    by_question: dict[str, list[tuple[str, str]]] = {}
    for (_, qa), pred in zip(items, answers):
        by_question.setdefault(qa["question"], []).append((pred, qa["answer"]))
    per_question = {q: M.vqa_exact_match([p for p, _ in v], [a for _, a in v]) for q, v in by_question.items()}
    return {"n": len(items), "exact_match": M.vqa_exact_match(answers, [qa["answer"] for _, qa in items]),
            "per_question": per_question if len(per_question) <= 20 else None}


def retrieval_eval(em: EvalModel, samples: list[EvalSample], opts: EvalOptions) -> dict[str, Any] | None:
    samples = [s for s in samples if s.caption][: opts.retrieval_samples]
    if len(samples) < 2:
        return None
    method = opts.retrieval
    if method == "auto":
        method = "contrastive" if em.module.alignment is not None else "likelihood"
    tok, cfg = em.tokenizer, em.module.vlm.config
    texts = [tok(s.caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in samples]
    px = torch.stack([em.transform(s.image) for s in samples])
    feats = image_features(em.module, px, opts.batch_size)
    if method == "contrastive":
        sim = contrastive_similarity(em.module, feats, texts, opts.batch_size)
    else:
        prompt = caption_prompt(tok, cfg.image_token_id, cfg.image_seq_length)
        sim = likelihood_similarity(em.module, feats, texts, prompt, opts.batch_size)
    keys = [s.caption for s in samples]
    return {"method": method, **M.retrieval_metrics(sim, keys, keys)}


def evaluate(cfg: Config, checkpoint: str | Path, opts: EvalOptions | None = None) -> dict[str, Any]:
    opts = opts or EvalOptions()
    if not cfg.data.val:
        raise ValueError("pretrain eval needs data.val sources in the config")
    started = time.perf_counter()
    em = load_eval_model(cfg, checkpoint, opts.device)
    samples = read_eval_samples(cfg.data.val, opts.samples)
    if not samples:
        raise ValueError(f"no usable validation samples in {[s.urls for s in cfg.data.val]}")
    result: dict[str, Any] = {"checkpoint": str(em.checkpoint), "step": em.step, "samples": len(samples)}
    tasks = set(opts.tasks)
    result["val"] = loss_metrics(em, samples, opts.batch_size) if "loss" in tasks else None
    result["captioning"] = caption_metrics(em, samples, opts) if "captioning" in tasks else None
    result["vqa"] = vqa_metrics(em, samples, opts) if "vqa" in tasks else None
    result["retrieval"] = retrieval_eval(em, samples, opts) if "retrieval" in tasks else None
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
