"""Committed checkpoint -> Hugging Face directory loadable as LlavaForConditionalGeneration (LlavaNext for an AnyRes
run) + its processor.

Streaming: the model is never consolidated. Each output tensor is read piece by piece (at most 32 MiB) from
DeepSpeed's shards (zero.py) and appended to a safetensors shard whose header was written first
(safetensors_stream.py); neither a whole tensor nor a whole output shard is ever in memory. What bounds the peak:
the pages of the memory-mapped rank files read since the last release (at most 256 MiB, then they are unmapped),
a few pieces, and the interpreter with torch/transformers/deepspeed (~0.4 GB), whatever the model size.
Names and tied weights follow transformers' own save_pretrained (layout.py). Frozen parameters come from the
checkpoint (DeepSpeed saves them in the training dtype) or, where it lacks them or on request, from the run's
sources (sources.py).

Output: model(-0000i-of-0000n).safetensors (+ model.safetensors.index.json when sharded), config.json,
generation_config.json, tokenizer (with <image>), processor config (with the image processor), chat template.
No pickles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaProcessor

from pretrain.config import ModelConfig
from pretrain.export.chat_template import export_chat_template
from pretrain.export.layout import ExportLayout, ExportTensor, export_layout
from pretrain.export.lora import LoraSources, write_adapter
from pretrain.export.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from pretrain.export.sources import SourceWeights
from pretrain.export.zero import ZeroCheckpoint
from pretrain.model.lora import target_pattern
from pretrain.tokens import IMAGE_TOKEN
from pretrain.train import checkpoint as ckpt

log = logging.getLogger(__name__)
PREFIX = "vlm."  # VLMForTraining holds the Llava model as `vlm`
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FROZEN_FROM = ("checkpoint", "source")


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag directory, `latest`, a run's `checkpoints/` folder (its newest committed), or a run directory."""
    if str(path) in ("auto", "none"):
        raise FileNotFoundError(f"{path}: give a checkpoint path (a run directory, its checkpoints/latest or a tag)")
    return ckpt.resolve_checkpoint(path)


def run_model_config(tag_dir: Path, run_config: str | Path | None = None) -> ModelConfig | None:
    """The run's `model` section: from `run_config`, else the checkpoint's own copy of the run config, else the run
    directory's config.yaml (checkpoints/<tag>/../..)."""
    if run_config and not Path(run_config).is_file():
        raise FileNotFoundError(f"{run_config}: no such run config")
    candidates = [Path(run_config)] if run_config else [tag_dir / "config.yaml", tag_dir.parent.parent / "config.yaml"]
    path = next((p for p in candidates if p.is_file()), None)
    return ModelConfig(**yaml.safe_load(path.read_text())["model"]) if path else None


def save_processor(meta: Path, config: LlavaConfig, out: Path, data: dict | None = None) -> None:
    """The processor of the export into `out`. A video model (LlavaNextVideo) gets LlavaNextVideoProcessor: the
    LlavaNext processor's files plus the video processor's config (pretrain.export.video_processor), with the
    run's frame budget (`data`: its data section, data.video_frames / data.video_fps) for inference."""
    processor_from(meta, config).save_pretrained(out)
    if hasattr(config, "video_token_id"):
        from pretrain.export.video_processor import add_video_processor

        data = data or {}
        add_video_processor(out, config, data.get("video_frames"), data.get("video_fps"))


def run_data_section(tag_dir: Path, run_config: str | Path | None = None) -> dict:
    """The run's `data` section as written (see run_model_config), or {} when no run config is found."""
    candidates = [Path(run_config)] if run_config else [tag_dir / "config.yaml", tag_dir.parent.parent / "config.yaml"]
    path = next((p for p in candidates if p.is_file()), None)
    return (yaml.safe_load(path.read_text()).get("data") or {}) if path else {}


def processor_from(meta: Path, config: LlavaConfig) -> LlavaProcessor:
    tokenizer = AutoTokenizer.from_pretrained(meta)
    tokenizer.chat_template = export_chat_template(tokenizer.chat_template)  # typed messages -> training's text
    image_processor = AutoImageProcessor.from_pretrained(meta)
    if hasattr(config, "image_grid_pinpoints"):  # AnyRes: LlavaNextProcessor, with the pinpoints of the run
        from pretrain.data.anyres import llava_next_processor

        return llava_next_processor(image_processor, tokenizer, config)
    vision = config.vision_config
    has_cls = vision.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        patch_size=vision.patch_size, vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0, image_token=IMAGE_TOKEN)


@dataclass
class Planned:
    tensor: ExportTensor
    origin: str  # "checkpoint" | "source" | "merged" (a LoRA run's base weight + adapter)
    pieces: Callable[[], Iterator[torch.Tensor]]


class _Sources:
    """The run's sources, opened only if some tensor needs them."""

    def __init__(self, mcfg: ModelConfig | None) -> None:
        self.mcfg, self._weights = mcfg, None

    def shape(self, name: str) -> tuple[int, ...] | None:
        if self.mcfg is None:
            return None
        if self._weights is None:
            self._weights = SourceWeights(self.mcfg)
        return self._weights.shape(name)

    def pieces(self, name: str) -> Iterator[torch.Tensor]:
        return self._weights.pieces(name)

    def pieces_checked(self, name: str) -> Iterator[torch.Tensor]:
        if self.shape(name) is None:
            raise FileNotFoundError(f"{name}: not in the run's sources (model.init_from / model.llm)")
        return self.pieces(name)


def plan(layout: ExportLayout, zero: ZeroCheckpoint, sources: _Sources, frozen_from: str,
         lora: LoraSources | None = None) -> list[Planned]:
    """Where each exported tensor comes from. Trainable ones: the checkpoint's fp32 master weights. Frozen ones:
    the checkpoint's copy, or the source's when the checkpoint lacks it or `frozen_from == "source"` (and the
    source has it in the same shape: rows added for new tokens exist only in the checkpoint). A LoRA run's adapted
    weights: base and adapter merged (pretrain.export.lora)."""
    for dropped, kept in layout.tied.items():
        if PREFIX + dropped in zero.locs and zero.resolve(PREFIX + dropped) != zero.resolve(PREFIX + kept):
            raise ValueError(f"the config ties {dropped} to {kept}, but the checkpoint trained them separately")
    planned, missing = [], []
    for t in layout.tensors:
        if lora is not None and lora.merged(t.name) is not None:
            planned.append(Planned(t, "merged", lambda n=t.name: lora.merged(n)))
            continue
        held = zero.resolve(PREFIX + t.name) or (lora.resolve(t.name) if lora is not None else None)
        frozen = held is None or held not in zero.trainable
        from_source = frozen and (held is None or frozen_from == "source") and sources.shape(t.name) == t.shape
        if not from_source and held is not None and zero.locs[held].shape != t.shape:  # (a 4-bit QLoRA base: source)
            raise ValueError(f"{t.name}: shape {zero.locs[held].shape} in the checkpoint, {t.shape} in the config")
        if from_source:
            planned.append(Planned(t, "source", lambda n=t.name: sources.pieces(n)))
        elif held is not None:
            planned.append(Planned(t, "checkpoint", lambda n=held: zero.pieces(n)))
        else:
            missing.append(t.name)
    if missing:
        raise FileNotFoundError(f"{len(missing)} tensors are neither in the checkpoint nor in the run's sources "
                                f"(model.llm / model.vision / model.init_from): {missing[:5]}")
    return planned


def write_weights(out: Path, planned: list[Planned], dtype: torch.dtype, max_shard_size: str | int,
                  n_parameters: int) -> None:
    def out_dtype(t: ExportTensor) -> torch.dtype:
        return dtype if t.floating else t.dtype

    shapes = {p.tensor.disk_name: torch.empty(p.tensor.shape, dtype=out_dtype(p.tensor), device="meta")
              for p in planned}
    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    by_disk = {p.tensor.disk_name: p for p in planned}
    for filename, names in split.filename_to_tensors.items():
        specs = [TensorSpec(n, by_disk[n].tensor.shape, out_dtype(by_disk[n].tensor)) for n in names]
        with StreamingSafetensorsWriter(out / filename, specs, {"format": "pt"}) as writer:
            for spec in specs:
                writer.write_tensor(spec.name, (piece.to(spec.dtype) for piece in by_disk[spec.name].pieces()))
        log.info("wrote %s (%d tensors)", filename, len(names))
    if split.is_sharded:
        index = {"metadata": {"total_parameters": n_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    earlier = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    if out.exists() and any(out.iterdir()) and not earlier:
        raise FileExistsError(f"{out}: exists and is not an earlier export; refusing to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    _check_out_dir(out)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def convert(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", max_shard_size: str | int = "5GB",
            *, frozen_from: str = "checkpoint", run_config: str | Path | None = None, adapter: bool = False) -> Path:
    """Export a committed checkpoint. `frozen_from="source"` takes frozen weights from the run's sources even where
    the checkpoint has them (DeepSpeed keeps frozen weights in the training dtype only, e.g. bf16). `adapter`: a
    LoRA run's adapter as a PEFT directory over its model.init_from (pretrain.export.lora), instead of merged."""
    if dtype not in DTYPES or frozen_from not in FROZEN_FROM:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, frozen_from one of {list(FROZEN_FROM)}")
    tag_dir, out = resolve_checkpoint(checkpoint), Path(out_dir)
    _check_out_dir(out)
    meta = tag_dir / ckpt.HF_META
    config = AutoConfig.from_pretrained(meta)  # a LlavaConfig, or a LlavaNextConfig for an AnyRes run
    layout = export_layout(config)
    zero = ZeroCheckpoint(tag_dir)
    mcfg = run_model_config(tag_dir, run_config)
    if adapter:
        return _export_adapter(tag_dir, out, layout, zero, mcfg, run_config)
    sources = _Sources(mcfg)
    if mcfg is not None and mcfg.lora.quantize != "none":
        frozen_from = "source"  # QLoRA: the checkpoint's frozen decoder is 4-bit; the originals are exported
    lora = LoraSources(zero, PREFIX, mcfg.lora if mcfg else None, source_base=sources.pieces_checked)
    planned = plan(layout, zero, sources, frozen_from, lora)
    _log_origins(planned, zero)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_weights(tmp, planned, DTYPES[dtype], max_shard_size, layout.n_parameters)
        config.use_cache = True  # the trainer turns the cache off; generation wants it
        config.text_config.use_cache = True
        config.dtype = str(DTYPES[dtype]).split(".")[1]
        config.architectures = [type(layout.model).__name__]  # as save_pretrained records it
        config.save_pretrained(tmp)
        layout.model.generation_config.save_pretrained(tmp)
        save_processor(meta, config, tmp, run_data_section(tag_dir, run_config))
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (%s, ZeRO-%d x %d ranks)", tag_dir, out, dtype, zero.stage, zero.world_size)
    return out


def _export_adapter(tag_dir: Path, out: Path, layout: ExportLayout, zero: ZeroCheckpoint, mcfg: ModelConfig | None,
                    run_config: str | Path | None) -> Path:
    if mcfg is None or not mcfg.lora.enabled:
        raise ValueError(f"--adapter: {tag_dir} is not from a LoRA run (model.lora.r is 0 or its config is missing)")
    stage = run_stage(tag_dir, run_config)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_adapter(zero, PREFIX, mcfg, stage, target_pattern(layout.model, mcfg.lora), tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported the adapter of %s -> %s (over %s)", tag_dir, out, mcfg.init_from)
    return out


def run_stage(tag_dir: Path, run_config: str | Path | None = None) -> str:
    candidates = [Path(run_config)] if run_config else [tag_dir / "config.yaml", tag_dir.parent.parent / "config.yaml"]
    path = next(p for p in candidates if p.is_file())
    return yaml.safe_load(path.read_text())["train"]["stage"]


def _log_origins(planned: list[Planned], zero: ZeroCheckpoint) -> None:
    from_source = [p.tensor.name for p in planned if p.origin == "source"]
    if from_source:
        log.info("%d frozen tensors taken from the run's sources (e.g. %s)", len(from_source), from_source[0])
    held = {p.tensor.name: zero.resolve(PREFIX + p.tensor.name) for p in planned
            if p.origin == "checkpoint" and p.tensor.floating}
    low = [name for name, h in held.items() if h is not None and zero.locs[h].dtype.itemsize < 4]
    if low:
        log.info("%d frozen tensors are stored in 16 bits in the checkpoint (the training dtype); "
                 "--frozen-from source takes the full-precision originals", len(low))
