"""`pretrain eval`: one checkpoint, the first N validation samples, every metric the data supports, one JSON object.

- loss / perplexity / image-ablation gap: the first N validation samples of every kind (images, several images,
  tiled images, clips, documents, text) through the training loader (the one path training reads and validates
  through: pretrain.train.engine.make_loader, unshuffled, one pass) and the training-time validation loop
  (pretrain.train.validation); what the loader skipped is reported by reason;
- captioning (samples with a caption): greedy captions in the pretraining format, BLEU-4 and CIDEr-D against the
  reference caption, and for the synthetic shapes set the attribute accuracy of the generated captions;
- VQA (samples with `qa` pairs): greedy answers to each question in the chat format, exact match;
- retrieval (samples with a caption): Recall@1/5/10 both ways, by contrastive similarity when the run trained the
  heads, otherwise by caption likelihood (retrieval.py); `method` says which.
The task metrics take the same first N samples (shard order, as the unshuffled loader reads them) that they can
use: one image of one tile with its references (captions, `qa`, synthetic attributes). `task_samples` says how many
they used and, by kind, how many they left out (several images, tiled images, clips, documents, text, and samples
the training path skips, by reason). Metrics with no data, or not asked for (`tasks`), are null.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pretrain.config import Config
from pretrain.data.errors import SampleError
from pretrain.data.image import decode_image
from pretrain.data.sample import all_image_bytes, read_metadata, sample_kind
from pretrain.data.stream import ShardReader, TarShardError
from pretrain.data.urls import expand_urls
from pretrain.eval import scores as M
from pretrain.eval.greedy import caption_prompt, greedy_generate, question_prompt, stop_ids
from pretrain.eval.loading import EvalModel, load_eval_model
from pretrain.eval.retrieval import contrastive_similarity, image_features, likelihood_similarity
from pretrain.train.engine import make_loader
from pretrain.train.validation import validation_metrics

log = logging.getLogger(__name__)


TASKS = ("loss", "captioning", "vqa", "retrieval")


@dataclass
class EvalSample:
    """A validation sample the task metrics use: its image and references."""

    key: str
    image: Image.Image
    caption: str | None  # the reference caption (None for conversation-only samples)
    qa: list[dict[str, str]] = field(default_factory=list)  # [{"question": ..., "answer": ...}]
    attributes: dict[str, Any] | None = None  # synthetic shapes ground truth


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


def loss_metrics(em: EvalModel, cfg: Config, opts: EvalOptions) -> dict[str, Any]:
    """Validation loss over the first `opts.samples` samples the training loader reads from data.val (unshuffled,
    one pass, batches of `opts.batch_size`, so the last batch may take the count past N): every sample kind, and
    what the loader skipped on the way, by reason."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.micro_batch_size = opts.batch_size
    loader = make_loader(cfg, cfg.data.val, em.processor, em.tokenizer.pad_token_id, 0, 1, train=False)
    taken = [0]

    def first_samples():
        for batch in loader:
            taken[0] += batch["n_samples"]
            yield batch
            if taken[0] >= opts.samples:
                return

    out: dict[str, Any] = validation_metrics(em.module, first_samples(), em.device, image_ablation=True)
    out["samples"] = taken[0]
    out["skipped"] = {k: v for d in loader.stats()["skipped"] for k, v in d.items()}
    return out


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


def task_samples(em: EvalModel, cfg: Config, limit: int) -> tuple[list[EvalSample], dict[str, int]]:
    """The first `limit` validation samples in shard order that the task metrics can use (one single-tile image
    and the references), and the count of the others by kind or skip reason."""
    reader, out, left_out, seen = ShardReader(), [], {}, 0
    for source in cfg.data.val:
        for url in expand_urls(source.urls):
            try:
                for raw in reader.iterate(url):
                    if seen >= limit:
                        return out, left_out
                    seen += 1
                    why, sample = _usable(em, raw.key, raw.parts)
                    if sample is None:
                        left_out[why] = left_out.get(why, 0) + 1
                    else:
                        out.append(sample)
            except TarShardError as err:
                log.warning("eval: %s", err)
                left_out["truncated_tar"] = left_out.get("truncated_tar", 0) + 1
    return out, left_out


def _usable(em: EvalModel, key: str, parts: dict[str, bytes]) -> tuple[str, EvalSample | None]:
    """(why it is left out, or "" and the sample): the training path must take it, and the generation prompts
    here take one tower-size image."""
    kind = sample_kind(parts)
    try:
        processed = em.processor(parts)
        meta = read_metadata(parts)
    except SampleError as err:
        return err.reason, None
    if kind != "image":
        return kind, None
    if processed.pixel_values is None or processed.pixel_values.shape[0] != 1:
        return "tiled", None
    try:
        image = decode_image(all_image_bytes(parts)[0])
    except SampleError as err:
        return err.reason, None
    caption = meta["caption"].strip() or None if isinstance(meta.get("caption"), str) else None
    qa = [q for q in meta.get("qa", []) if isinstance(q, dict) and "question" in q and "answer" in q]
    attrs = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else None
    return "", EvalSample(key, image, caption, qa, attrs)


def evaluate(cfg: Config, checkpoint: str | Path, opts: EvalOptions | None = None) -> dict[str, Any]:
    opts = opts or EvalOptions()
    if not cfg.data.val:
        raise ValueError("pretrain eval needs data.val sources in the config")
    started = time.perf_counter()
    em = load_eval_model(cfg, checkpoint, opts.device)
    samples, left_out = task_samples(em, cfg, opts.samples)
    result: dict[str, Any] = {"checkpoint": str(em.checkpoint), "step": em.step, "samples": opts.samples,
                              "task_samples": {"used": len(samples), "left_out": left_out}}
    tasks = set(opts.tasks)
    result["val"] = loss_metrics(em, cfg, opts) if "loss" in tasks else None
    result["captioning"] = caption_metrics(em, samples, opts) if "captioning" in tasks else None
    result["vqa"] = vqa_metrics(em, samples, opts) if "vqa" in tasks else None
    result["retrieval"] = retrieval_eval(em, samples, opts) if "retrieval" in tasks else None
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
