"""Task metrics: captioning (BLEU-4, CIDEr-D), VQA exact match, retrieval Recall@K, synthetic attribute accuracy.

BLEU-4 is sacreBLEU's corpus BLEU (Post 2018, "A Call for Clarity in Reporting BLEU Scores"), lower-cased, its
default 13a tokenisation, on its 0-100 scale. CIDEr is CIDEr-D exactly as the COCO caption evaluation code computes
it (Vedantam, Zitnick, Parikh 2015, "CIDEr: Consensus-based Image Description Evaluation", arXiv:1411.5726; the
reference implementation is pycocoevalcap/cider/cider_scorer.py): TF-IDF weighted n-gram vectors (n = 1..4) with
document frequencies over the reference sets of the evaluated corpus, clipped cosine similarity, a Gaussian length
penalty (sigma 6), averaged over n and over references, times 10. pycocoevalcap itself is not a dependency: its
wheel is ~100 MB (it bundles Java jars for METEOR/SPICE/PTB tokenisation); its CIDEr is ~100 lines of Python,
redone here and checked against values the reference code gives (tests/eval/test_eval_metrics.py). Its PTB tokeniser
(Java) is replaced by lower-casing and dropping punctuation, which is what it does to plain English captions.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

_PUNCT = re.compile(r"[^\w\s']")


def caption_tokens(text: str) -> list[str]:
    """Lower-case words without punctuation (what COCO's PTB tokeniser leaves of a plain caption)."""
    return _PUNCT.sub(" ", text.lower()).split()


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacreBLEU, 0-100). `references[i]` are the reference captions of hypothesis i; images may
    have different numbers of references (sacreBLEU takes reference streams, padded here with None)."""
    from sacrebleu.metrics import BLEU

    if not hypotheses:
        return float("nan")
    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(BLEU(lowercase=True).corpus_score(list(hypotheses), streams).score)


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of the corpus and of each hypothesis, as pycocoevalcap's CiderScorer computes them."""
    hyps = [_ngrams(caption_tokens(h), n) for h in hypotheses]
    refs = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in references]
    if not hyps:
        return float("nan"), []
    df: Counter = Counter()
    for rs in refs:  # document frequency: in how many images' reference sets an n-gram occurs
        df.update({g for r in rs for g in r})
    log_docs = math.log(float(len(refs)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (log_docs - math.log(max(1.0, df[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # sic: the reference code counts bigrams as the "length"; kept for identical scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(h: tuple, r: tuple) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = h, r
        out = []
        for k in range(n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2)))
        return out

    scores = []
    for h, rs in zip(hyps, refs):
        hv = vector(h)
        total = [0.0] * n
        for r in rs:
            total = [a + b for a, b in zip(total, similarity(hv, vector(r)))]
        scores.append(sum(total) / n / len(rs) * 10.0)
    return sum(scores) / len(scores), scores


_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation, in its essentials: lower case, punctuation dropped, number words
    as digits, articles removed, whitespace collapsed."""
    words = caption_tokens(text.replace("'", " "))
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_exact_match(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal (after normalize_answer) to the answer, or to any of several answers."""
    if not predictions:
        return float("nan")
    hits = 0
    for pred, ans in zip(predictions, answers):
        options = [ans] if isinstance(ans, str) else list(ans)
        hits += normalize_answer(pred) in {normalize_answer(a) for a in options}
    return hits / len(predictions)


def recall_at_k(sim: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K of each query (row of `sim`): a hit when any relevant candidate is among the K most similar."""
    order = sim.float().argsort(dim=1, descending=True)
    hit_rank = relevant.gather(1, order).float().argmax(dim=1)  # first relevant position (0 if none; masked below)
    has = relevant.any(dim=1)
    return {k: float(((hit_rank < k) & has).float().mean()) for k in ks}


def retrieval_metrics(sim: torch.Tensor, image_keys: Sequence[Any], text_keys: Sequence[Any],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image Recall@K from an image x text similarity matrix. An image and a text match when
    their keys are equal (the caption text), so duplicate captions count as correct, as they are. `chance_r1`: the
    expected image->text Recall@1 of random ranking."""
    relevant = torch.tensor([[a == b for b in text_keys] for a in image_keys], dtype=torch.bool)
    i2t, t2i = recall_at_k(sim, relevant, ks), recall_at_k(sim.T, relevant.T, ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    out["chance_r1"] = float(relevant.float().mean(1).mean())
    out["n"] = len(image_keys)
    return out


def attribute_accuracy(texts: Sequence[str], attributes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Synthetic shapes: the fraction of generated captions naming each true attribute (parse_caption), their mean,
    and chance level (uniform guessing) for reference."""
    from pretrain.shards.synthetic import COLORS, COUNT_WORDS, POSITIONS, SHAPES, parse_caption

    names = {"color": COLORS, "shape": SHAPES, "count": COUNT_WORDS, "position": POSITIONS}
    hits = dict.fromkeys(names, 0)
    for text, attrs in zip(texts, attributes):
        found = parse_caption(text)
        for a in names:
            hits[a] += int(found.get(a) == attrs[a])
    acc = {a: hits[a] / max(len(texts), 1) for a in names}
    acc["mean"] = sum(acc[a] for a in names) / len(names)
    acc["chance_mean"] = sum(1 / len(v) for v in names.values()) / len(names)
    return acc
