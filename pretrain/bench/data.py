"""`pretrain bench data`: samples per second per loader worker, our data path against the common practice, in one
run on the same shards.

Paths: ours (the training loader: shard index, shuffle buffer, decode + the processor-exact transform, tokenize,
batch; `data.packing` as configured), ours with `data.fast_image_decode=true`, and the common practice
(`common_practice.webdataset_loader`: webdataset + the transformers image processor + the tokenizer, padded).
Two more rows time the AnyRes image path alone, per image in this process: our decode + tiling against Pillow +
transformers' LlavaNextImageProcessor on the same image bytes (their ratios compare with the latter).
Each is run in rounds, interleaved (noise on a shared machine hits every path alike), after a warm-up that covers
worker start-up and the shuffle buffer filling. Per core = samples per CPU-second of every process involved (the
loader workers and the main process), which does not depend on how busy the rest of the machine is.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import torch

from pretrain.bench.common_practice import LlavaStyleSample, batches, webdataset_loader
from pretrain.config import Config
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.model.processing import DataProcessing, sample_processor

PATHS = ("ours", "ours-fast", "common")
# AnyRes image path alone, per image, in this process: our decode + tiling against Pillow + LlavaNextImageProcessor
# (the recipe's pinpoints, or the default ones of its tower); their "x" columns compare with the LlavaNext row.
ANYRES_PATHS = ("anyres-ours", "anyres-hf")
LABELS = {"ours": "ours (exact)", "ours-fast": "ours (fast_image_decode)",
          "common": "webdataset + HF processor + tokenizer",
          "anyres-ours": "AnyRes image: decode + tiles (ours; tiles/image last)",
          "anyres-hf": "AnyRes image: PIL + LlavaNextImageProcessor (tiles/image last)"}
ANYRES_IMAGES = 64  # images read from the shards for the AnyRes rows


@dataclass
class Rate:
    samples: int
    tokens: int
    wall_s: float
    cpu_s: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s

    @property
    def samples_per_cpu_s(self) -> float:
        return self.samples / self.cpu_s if self.cpu_s > 0 else float("nan")


def _cpu_seconds() -> dict[int, float]:
    """CPU time (user + system) of this process and each of its descendants, by pid."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:  # a worker that just exited
            continue
    return out


def measure(make: Callable[[], Iterator[tuple[int, int]]], seconds: float, warmup_s: float) -> Rate:
    """Consume (samples, tokens) batches for `seconds` after `warmup_s` (at least one batch) of warm-up."""
    it = make()
    start = time.perf_counter()
    next(it)
    while time.perf_counter() - start < warmup_s:
        next(it)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    samples = tokens = 0
    while time.perf_counter() - t0 < seconds:
        s, t = next(it)
        samples, tokens = samples + s, tokens + t
    wall, cpu1 = time.perf_counter() - t0, _cpu_seconds()
    close = getattr(it, "close", None)
    if close:
        close()  # shuts the loader's workers down before the next path starts
    return Rate(samples, tokens, wall, sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items()))


def _ours(cfg: Config, processing: DataProcessing, urls: list[str], workers: int, fast: bool):
    fast_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"fast_image_decode": fast})})
    processor = sample_processor(fast_cfg, processing.tokenizer, processing.vlm_config, processing.image_processor)
    spec = LoaderSpec(sources=[urls], weights=[1.0], num_workers=workers, seed=cfg.run.seed, shuffle=True,
                      shuffle_buffer=cfg.data.shuffle_buffer, rows_per_batch=cfg.train.micro_batch_size,
                      max_length=cfg.data.max_length, packing=cfg.data.packing,
                      max_images_per_batch=cfg.data.max_images_per_batch,
                      pad_id=processing.tokenizer.pad_token_id)

    def run() -> Iterator[tuple[int, int]]:
        for batch in ResumableLoader(spec, processor):
            yield batch["n_samples"], int(batch["attention_mask"].sum())

    return run


def _common(cfg: Config, processing: DataProcessing, urls: list[str], workers: int):
    make = LlavaStyleSample(processing.image_processor, processing.tokenizer, processing.image_token_id,
                            processing.image_tokens, cfg.data.max_length)

    def run() -> Iterator[tuple[int, int]]:
        yield from batches(webdataset_loader(urls, make, cfg.train.micro_batch_size, workers,
                                             processing.tokenizer.pad_token_id, cfg.data.shuffle_buffer,
                                             cfg.run.seed))

    return run


def _anyres(cfg: Config, urls: list[str]) -> dict[str, Callable[[], Iterator[tuple[int, int]]]]:
    """Per image: (1, tiles) from our AnyResTransform and from the transformers processor, same image bytes."""
    import io
    import itertools

    from PIL import Image

    from pretrain.data.anyres import AnyResTransform
    from pretrain.data.image import decode_image
    from pretrain.data.sample import all_image_bytes
    from pretrain.data.stream import ShardReader
    from pretrain.data.urls import expand_urls
    from pretrain.model.processing import image_processor_for

    hf = image_processor_for(cfg.model.model_copy(update={"image_tiling": "anyres"}))
    ours = AnyResTransform(hf)
    reader, images = ShardReader(), []
    for url in expand_urls(urls):
        images += [data for raw in reader.iterate(url) for data in all_image_bytes(raw.parts)]
        if len(images) >= ANYRES_IMAGES:
            break
    images = images[:ANYRES_IMAGES]

    def run_ours() -> Iterator[tuple[int, int]]:
        for data in itertools.cycle(images):
            yield 1, int(ours(decode_image(data)).shape[0])

    def run_hf() -> Iterator[tuple[int, int]]:
        for data in itertools.cycle(images):
            yield 1, int(hf(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"].shape[1])

    return {"anyres-ours": run_ours, "anyres-hf": run_hf}


def bench_data(cfg: Config, processing: DataProcessing, urls: list[str], workers: int, seconds: float,
               rounds: int = 3, warmup_s: float = 3.0) -> dict[str, dict[str, float]]:
    """Median over `rounds` of each path's rates; `seconds` of measurement per path and round."""
    torch.set_num_threads(1)  # per core: the in-process path (workers=0) must not spread over threads
    makers = {"ours": _ours(cfg, processing, urls, workers, fast=False),
              "ours-fast": _ours(cfg, processing, urls, workers, fast=True),
              "common": _common(cfg, processing, urls, workers), **_anyres(cfg, urls)}
    rates: dict[str, list[Rate]] = {name: [] for name in PATHS + ANYRES_PATHS}
    for _ in range(rounds):
        for name in PATHS + ANYRES_PATHS:
            rates[name].append(measure(makers[name], seconds, warmup_s))
    out = {}
    for name, rs in rates.items():
        out[name] = {
            "samples_per_s": statistics.median(r.samples_per_s for r in rs),
            "samples_per_s_per_worker": statistics.median(r.samples_per_s for r in rs) / max(workers, 1),
            "samples_per_cpu_s": statistics.median(r.samples_per_cpu_s for r in rs),
            "tokens_per_sample": sum(r.tokens for r in rs) / max(sum(r.samples for r in rs), 1),
            "samples": sum(r.samples for r in rs),
        }
    for names, base in ((PATHS, "common"), (ANYRES_PATHS, "anyres-hf")):
        for name in names:
            out[name]["per_core_vs_common"] = out[name]["samples_per_cpu_s"] / out[base]["samples_per_cpu_s"]
            out[name]["per_worker_vs_common"] = out[name]["samples_per_s"] / out[base]["samples_per_s"]
    return out


def table(result: dict[str, dict[str, float]], workers: int) -> tuple[list[str], list[list]]:
    header = ["path", "samples/s", f"per worker ({workers or 'in-process'})", "samples per CPU-s",
              "x common (per core)", "x common (per worker)", "tokens/sample"]
    rows = [[LABELS[name], r["samples_per_s"], r["samples_per_s_per_worker"], r["samples_per_cpu_s"],
             f"{r['per_core_vs_common']:.2f}x", f"{r['per_worker_vs_common']:.2f}x", r["tokens_per_sample"]]
            for name, r in result.items()]
    return header, rows


TARGET_MFU = 0.5


def gpu_demand(cfg: Config, tokens_per_sample: float, gpu: str, delivered_per_s: float,
               workers: int) -> dict[str, float | str]:
    """Samples/s the recipe's model consumes on one `gpu` at TARGET_MFU (pretrain.model.flops: one image per
    sample of the measured mean length, the recipe's stage), next to what one rank's loader workers delivered."""
    from pretrain.model.flops import flops_per_sample, peak_flops
    from pretrain.plan.shapes import model_shape

    flops = flops_per_sample(model_shape(cfg.model), round(tokens_per_sample), images=1,
                             stage=cfg.train.stage).total
    consumed = TARGET_MFU * peak_flops(gpu) / flops
    per_worker = delivered_per_s / max(workers, 1)
    return {"gpu": gpu, "mfu": TARGET_MFU, "flops_per_sample": flops, "consumed_samples_per_s": consumed,
            "delivered_samples_per_s": delivered_per_s, "delivered_vs_consumed": delivered_per_s / consumed,
            "workers_needed": math.ceil(consumed / per_worker) if per_worker > 0 else float("inf")}


def demand_note(d: dict) -> str:
    verdict = "keeps up" if d["delivered_vs_consumed"] >= 1 else "starves the GPU"
    return (f"GPU demand ({d['gpu']}, {d['mfu']:.0%} MFU, FLOPs model): the model consumes "
            f"{d['consumed_samples_per_s']:.1f} samples/s; this rank's loader delivered "
            f"{d['delivered_samples_per_s']:.1f} ({d['delivered_vs_consumed']:.2f}x: {verdict}); about "
            f"{d['workers_needed']} workers of this speed per GPU would keep up.")
