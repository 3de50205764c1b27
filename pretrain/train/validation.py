"""Validation: the one validation-loss loop (training-time validation and `pretrain eval` both run it), and a few val
images captioned by the model as it trains (TensorBoard).

Image-ablation gap: the validation loss again with each micro-batch's images rolled by one place (every sample gets
another sample's image), minus the loss with the true images. A model that reads the images pays for the wrong
ones; a model that learned only the text priors loses nothing. Tiled images (AnyRes) and several images per sample
take per-image token counts, so their tiles are rolled by one place instead (each image keeps its tile count and
size, and every tile gets another tile's pixels); clips' frames are rolled by the first clip's length (clips trade
frames; a single clip's frames rotate). (A micro-batch with a single one-tile image and no clip cannot shuffle and
adds no gap.)

Captions come from greedy generation through the training model itself (no export). Under ZeRO-3 every forward
gathers parameters collectively, so every rank reads the same few val samples and runs the same generation loop
(`synced_gpus`, as the HF Trainer does); rank 0 alone writes. Without ZeRO-3 rank 0 generates alone.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pretrain import distributed
from pretrain.config import Config
from pretrain.data.errors import SampleError
from pretrain.data.sample import SampleProcessor, image_bytes
from pretrain.data.stream import ShardReader, TarShardError
from pretrain.data.urls import expand_urls
from pretrain.model.sequence_parallel import shard_batch
from pretrain.tokens import IGNORE
from pretrain.train.engine import make_loader
from pretrain.train.run_log import MetricsWriter
from pretrain.train.step import to_device

log = logging.getLogger(__name__)


@dataclass
class CaptionSample:
    prompt: list[int]  # input ids up to the first label: `[bos] <image>*N` for captions, the user turn for chats
    pixel_values: torch.Tensor
    truth: str
    image: Image.Image


def caption_samples(cfg: Config, processor: SampleProcessor, tokenizer: Any, n: int) -> list[CaptionSample]:
    """The first `n` usable samples with an image of the val sources, in shard order (the same on every rank)."""
    out: list[CaptionSample] = []
    reader = ShardReader()
    for source in cfg.data.val:
        for url in expand_urls(source.urls):
            try:
                for raw in reader.iterate(url):
                    sample = _caption_sample(raw.parts, processor, tokenizer)
                    if sample is not None:
                        out.append(sample)
                    if len(out) == n:
                        return out
            except TarShardError as err:
                log.warning("validation captions: %s", err)
    return out


def _caption_sample(parts: dict[str, bytes], processor: SampleProcessor, tokenizer: Any) -> CaptionSample | None:
    try:
        s = processor(parts)
        data = image_bytes(parts)
        if s.pixel_values is None or data is None or s.pixel_values.shape[0] != 1:
            return None  # captions of single-tile, single-image samples only
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except (SampleError, OSError):
        return None
    first = next((i for i, x in enumerate(s.labels) if x != IGNORE), None)
    if first is None or first == 0:
        return None
    truth = tokenizer.decode([t for t, x in zip(s.input_ids, s.labels) if x != IGNORE], skip_special_tokens=True)
    image.thumbnail((256, 256))
    return CaptionSample(s.input_ids[:first], s.pixel_values[0], truth.strip(), image)


@torch.no_grad()
def generate_captions(engine: Any, samples: list[CaptionSample], tokenizer: Any, device: torch.device,
                      max_new_tokens: int, synced: bool) -> list[str]:
    """Greedy captions, batched by prompt length (no padding needed: caption prompts all have the same length)."""
    vlm = engine.module.vlm
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(len(s.prompt), []).append(i)
    out = [""] * len(samples)
    was_training = vlm.training
    vlm.eval()
    try:
        for length, idx in sorted(groups.items()):
            ids = torch.tensor([samples[i].prompt for i in idx], device=device)
            pixels = torch.stack([samples[i].pixel_values for i in idx]).to(device, dtype=vlm.dtype)
            gen = vlm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                               max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced, use_cache=True,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, length:].tolist(), skip_special_tokens=True).strip()
    finally:
        vlm.train(was_training)
    return out


def captioned_image(image: Image.Image, generated: str, truth: str) -> np.ndarray:
    """The image with the generated caption and the truth written under it, HWC uint8 for TensorBoard."""
    font = ImageFont.load_default()
    width = max(image.width, 256)
    lines = _wrap("model: " + generated, width) + _wrap("truth: " + truth, width)
    canvas = Image.new("RGB", (width, image.height + 14 * len(lines) + 6), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, image.height + 3 + 14 * k), line, fill="black", font=font)
    return np.asarray(canvas)


def _wrap(text: str, width: int, char_px: int = 6) -> list[str]:
    per_line = max(8, width // char_px)
    return [text[i : i + per_line] for i in range(0, max(len(text), 1), per_line)][:4]


def shuffled_images(batch: dict) -> dict:
    """The batch with its image tiles rolled by one place and its clips' frames by the first clip's length (see the
    module docstring); each shape and token count stays as it was."""
    out = dict(batch)
    px = batch.get("pixel_values")
    if px is not None and px.shape[0] > 1:
        out["pixel_values"] = px.roll(1, dims=0)
    frames = batch.get("video_pixels")
    if frames is not None and frames.shape[0] > 1:
        out["video_pixels"] = frames.roll(batch["video_frames"][0] % frames.shape[0] or 1, dims=0)
    return out


@torch.no_grad()
def validation_metrics(model: Any, batches: Iterable[dict], device: torch.device, *, max_batches: int | None = None,
                       spare: Callable[[], dict] | None = None, image_ablation: bool = False) -> dict[str, float]:
    """Loss over this rank's `batches` (at most `max_batches`) and every other rank's: `loss` (the mean over all
    label tokens), `perplexity`, `batches` (counted here), and with `image_ablation` `loss_shuffled_images` and
    `image_gap`. `model`: a DeepSpeed engine or the module it wraps; it is put back in the mode it was in.

    ZeRO-3 lockstep: before each batch the ranks agree whether any of them still has one; a rank whose batches ran
    dry runs its last batch again (its first ever: `spare()`) through the same modules and does not count it. The
    loss sums stay on the device, the label count is the host number the forward returns: one read at the end."""
    was_training = model.training
    model.eval()
    sequence_parallel = getattr(getattr(model, "module", model), "sequence_parallel", None)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, loss with shuffled images
    count, counted, last = 0, 0, None
    it = iter(batches)
    try:
        for _ in range(max_batches) if max_batches is not None else itertools.count():
            batch = next(it, None)
            (holders,) = distributed.all_reduce_values([batch is not None])  # one number per batch, host-side
            if holders == 0:
                break
            real = batch is not None
            if not real:
                if last is None:
                    if spare is None:
                        raise RuntimeError("a rank ran out of validation batches and has no spare to keep lockstep")
                    last = spare()
                batch = last
            on_device = to_device(shard_batch(batch, sequence_parallel), device)
            loss, n = model(on_device)
            shuffled = model(shuffled_images(on_device))[0] if image_ablation else None
            if real:
                sums[0] += loss.double()
                if shuffled is not None:
                    sums[1] += shuffled.double()
                count, counted, last = count + int(n), counted + 1, batch
    finally:
        model.train(was_training)
    loss_sum, shuffled_sum, count = distributed.all_reduce_values([sums[0], sums[1], count])
    loss = loss_sum / max(count, 1.0)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": counted}
    if image_ablation:
        out["loss_shuffled_images"] = shuffled_sum / max(count, 1.0)
        out["image_gap"] = out["loss_shuffled_images"] - loss
    return out


class Validator:
    """Runs at `train.val_every`: val loss/perplexity on every rank, captions of `train.val_captions` images."""

    def __init__(self, cfg: Config, engine: Any, processor: SampleProcessor, tokenizer: Any, rank: int, world: int,
                 device: torch.device, run_dir: Path) -> None:
        self.cfg, self.engine, self.processor, self.tokenizer = cfg, engine, processor, tokenizer
        self.rank, self.world, self.device, self.run_dir = rank, world, device, run_dir
        self.zero3 = cfg.deepspeed.zero_stage == 3
        self._samples: list[CaptionSample] | None = None

    def metrics(self) -> dict[str, float]:
        """Loss and perplexity over one pass of `data.val`, at most train.val_batches batches per rank
        (collective)."""
        loader = make_loader(self.cfg, self.cfg.data.val, self.processor, self.tokenizer.pad_token_id, self.rank,
                             self.world, train=False)
        return validation_metrics(self.engine, loader, self.device, max_batches=self.cfg.train.val_batches,
                                  spare=self._spare_batch)

    def _spare_batch(self) -> dict:
        """A batch for a rank that had no validation data at all: the first of the whole val set."""
        loader = make_loader(self.cfg, self.cfg.data.val, self.processor, self.tokenizer.pad_token_id, 0, 1,
                             train=False)
        return next(iter(loader))

    def captions(self) -> list[dict[str, Any]]:
        """[{generated, truth, image}] on rank 0 (empty elsewhere)."""
        t = self.cfg.train
        if not t.val_captions or not (self.zero3 or self.rank == 0):
            return []
        if self._samples is None:
            self._samples = caption_samples(self.cfg, self.processor, self.tokenizer, t.val_captions)
        texts = generate_captions(self.engine, self._samples, self.tokenizer, self.device, t.val_caption_tokens,
                                  synced=self.zero3 and self.world > 1)
        if self.rank != 0:
            return []
        return [{"generated": g, "truth": s.truth, "image": s.image} for g, s in zip(texts, self._samples)]

    def run(self, writer: MetricsWriter, step: int) -> float:
        m = self.metrics()
        val = m["loss"]
        caps = self.captions()
        writer.scalar("val/loss", val, step)
        writer.scalar("val/perplexity", m["perplexity"], step)
        for i, c in enumerate(caps):
            writer.caption(f"val/caption_{i}", captioned_image(c["image"], c["generated"], c["truth"]),
                           f"**model:** {c['generated']}  \n**truth:** {c['truth']}", step)
        if self.rank == 0:
            record = {"step": step, "val_loss": val,
                      "captions": [{"generated": c["generated"], "truth": c["truth"]} for c in caps]}
            with open(self.run_dir / "val.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return val
