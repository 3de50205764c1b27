"""Helpers for the export tests: short real training runs, the training side of a parity check (our data path and
the training forward), and the Hugging Face side (plain transformers on the export)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers.runs import launch, write_config
from pretrain.config import Config, load_config
from pretrain.data.batching import collate
from pretrain.data.sample import SampleProcessor
from pretrain.model import processing
from pretrain.model.build import build_model, load_tokenizer
from pretrain.model.vlm import VLMForTraining
from pretrain.shards.synthetic import make_sample


def train_run(root: Path, assets: dict, shapes: dict, nproc: int = 2, llm: str = "llama", vision: str = "clip",
              **overrides) -> Path:
    """A short real run through `pretrain launch`; returns its run directory."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = write_config(root / "c.yaml", assets, shapes, llm=llm, vision=vision,
                       **{"train.max_steps": 2, **overrides})
    out = launch(cfg, nproc=nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "run"


def run_config(run_dir: Path) -> Config:
    return load_config(run_dir / "config.yaml")


def sample_processor(cfg: Config, tokenizer, vlm_config) -> SampleProcessor:
    """What the trainer builds (train/engine.py build_engine) to turn raw samples into model inputs."""
    return processing.sample_processor(cfg, tokenizer, vlm_config, processing.image_processor_for(cfg.model))


def val_samples(n: int = 2) -> list[dict]:
    """Synthetic held-out samples as raw WebDataset parts (PNG bytes + JSON caption)."""
    return [{k: (v.encode() if isinstance(v, str) else v) for k, v in make_sample("val", i).items()
             if k in ("png", "json")} for i in range(n)]


def training_model(run_dir: Path, state: dict[str, torch.Tensor]) -> tuple[VLMForTraining, object]:
    """The training wrapper as the run built it (pretrain.model.build), with `state` (DeepSpeed names) loaded."""
    cfg = run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    wrapper = VLMForTraining(build_model(cfg.model, tokenizer, seed=cfg.run.seed))
    wrapper.load_state_dict(state, strict=True)
    return wrapper.eval(), tokenizer


@torch.no_grad()
def training_logits(wrapper: VLMForTraining, batch: dict) -> torch.Tensor:
    """Full logits through the training forward: hidden states from VLMForTraining, then the lm head."""
    return wrapper.vlm.lm_head(wrapper.hidden_states(batch)).float()


def data_batch(run_dir: Path, tokenizer, vlm_config, parts: list[dict]) -> dict:
    processor = sample_processor(run_config(run_dir), tokenizer, vlm_config)
    return collate([[processor(p)] for p in parts], tokenizer.pad_token_id)


def hf_inputs(hf_dir: Path, parts: list[dict]) -> dict:
    """What a transformers user feeds the export: AutoProcessor on the images and `[bos]<image>caption[eos]`."""
    import io

    from PIL import Image

    processor = AutoProcessor.from_pretrained(hf_dir)
    tok = processor.tokenizer
    images = [Image.open(io.BytesIO(p["png"])).convert("RGB") for p in parts]
    texts = [tok.bos_token + "<image>" + json.loads(p["json"])["caption"] + tok.eos_token for p in parts]
    return processor(images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=False)


def load_export(hf_dir: Path, **kwargs) -> torch.nn.Module:
    model, info = AutoModelForImageTextToText.from_pretrained(hf_dir, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()
