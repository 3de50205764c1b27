"""The whole pipeline on a laptop CPU: synthetic shards -> tiny VLM trained with ZeRO-3 on 2 processes ->
Hugging Face export -> captions for held-out images, printed next to the truth."""

from __future__ import annotations

import importlib.resources
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from pretrain.model.tiny import build_tokenizer, write_tiny_decoder, write_tiny_vision
from pretrain.shards.synthetic import QUESTIONS, caption_for, parse_caption, write_synthetic

# Package data (configs/demo.yaml links to it), so an installed package runs the demo without the source tree.
DEMO_CONFIG = Path(str(importlib.resources.files("pretrain") / "recipes" / "demo.yaml"))
ATTRIBUTES = ("color", "shape", "count", "position")


def tokenizer_corpus(n: int = 2000) -> list[str]:
    """Texts to train the demo's BPE on: every caption form and question of the synthetic set."""
    from itertools import product

    from pretrain.shards.synthetic import COLORS, COUNT_WORDS, POSITIONS, SHAPES

    texts = [caption_for({"shape": s, "color": c, "count": k, "position": p})
             for s, c, k, p in product(SHAPES, COLORS, range(1, len(COUNT_WORDS) + 1), POSITIONS)]
    return texts + list(QUESTIONS.values()) + ["user", "assistant"]


def prepare(out: Path, n_train: int, n_val: int, seed: int = 0) -> dict[str, str]:
    """Data and the tiny model directories; returns the config overrides that point the demo config at them."""
    data = write_synthetic(out / "data", n_train, n_val, seed=seed, samples_per_shard=max(1, n_train // 8))
    tok = build_tokenizer(tokenizer_corpus(), vocab_size=400)
    llm = write_tiny_decoder(out / "assets" / "llm", tok, "llama", hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=4)
    vision = write_tiny_vision(out / "assets" / "vision", "clip")
    return {"run.output_dir": str(out / "run"), "model.llm": str(llm), "model.vision": str(vision),
            "data.train.0.urls": data["train"]["urls"], "data.val.0.urls": data["val"]["urls"]}


def read_samples(url_dir: Path, n: int) -> list[tuple[Image.Image, dict]]:
    out = []
    for shard in sorted(url_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            parts: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key in sorted(parts):
            p = parts[key]
            out.append((Image.open(io.BytesIO(p["png"])).convert("RGB"), json.loads(p["json"])))
            if len(out) == n:
                return out
    return out


def caption_report(hf_dir: Path, val_dir: Path, n: int) -> dict:
    """Generate captions for `n` validation images; print them beside the truth; return attribute accuracy."""
    from pretrain.export.inference import Captioner

    samples = read_samples(val_dir, n)
    captions = Captioner(hf_dir)([img for img, _ in samples])
    hits = dict.fromkeys(ATTRIBUTES, 0)
    print(f"\n{'generated':<40} | truth")
    print("-" * 84)
    for (_, meta), text in zip(samples, captions):
        print(f"{text:<40} | {meta['caption']}")
        found = parse_caption(text)
        for a in ATTRIBUTES:
            hits[a] += int(found.get(a) == meta["attributes"][a])
    acc = {a: hits[a] / max(len(samples), 1) for a in ATTRIBUTES}
    print("\nattribute accuracy on", len(samples), "validation images:",
          ", ".join(f"{a} {v:.0%}" for a, v in acc.items()))
    return acc


def run_demo(out_dir: str | Path = "demo_out", nproc: int = 2, n_train: int = 4000, n_val: int = 200,
             overrides: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from pretrain.export.hf import convert
    from pretrain.launch.local import launch_local

    hf_logging.disable_progress_bar()  # the demo's own steps and the training bar are what a user wants to read
    out = Path(out_dir).resolve()
    print(f"[1/4] synthetic shards and tiny model in {out}")
    paths = prepare(out, n_train, n_val)
    print(f"[2/4] training with DeepSpeed ZeRO-3 on {nproc} processes")
    code = launch_local(str(DEMO_CONFIG), nproc, [f"{k}={v}" for k, v in paths.items()] + list(overrides or []))
    if code != 0:
        print(f"training failed with exit code {code}")
        return code
    losses = [json.loads(line)["loss"] for line in open(out / "run" / "metrics.jsonl")]
    print(f"loss: first logged {losses[0]:.3f} -> last {losses[-1]:.3f}")
    print("[3/4] exporting the last checkpoint to Hugging Face format")
    hf = convert(out / "run", out / "hf")
    print("[4/4] captions for held-out images")
    caption_report(hf, out / "data" / "val", 8)
    return 0
