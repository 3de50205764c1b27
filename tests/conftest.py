"""Shared fixtures: tiny local models (the `from_pretrained` paths a hub id takes), synthetic shards, the loader
tests' sample processor and the real 2-node Slurm cluster. Helpers are in the `helpers` package. No network: hub
access is switched off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from helpers.slurm_cluster import slurm_cluster  # noqa: E402,F401  (the real 2-node Slurm cluster fixture)


@pytest.fixture(scope="session")
def tokenizer():
    from pretrain.demo import tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer

    return build_tokenizer(tokenizer_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny decoders (Llama, Qwen2) and towers (CLIP, SigLIP) saved as Hugging Face directories."""
    from pretrain.model.tiny import write_tiny_decoder, write_tiny_vision

    root = tmp_path_factory.mktemp("assets")
    return {
        "llama": write_tiny_decoder(root / "llama", tokenizer, "llama"),
        "qwen2": write_tiny_decoder(root / "qwen2", tokenizer, "qwen2"),
        "clip": write_tiny_vision(root / "clip", "clip"),
        "siglip": write_tiny_vision(root / "siglip", "siglip"),
    }


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict:
    """Synthetic shapes shards: 8 train shards of 64 samples, 1 val shard."""
    from pretrain.shards.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shapes"), 512, 64, seed=0, samples_per_shard=64)


@pytest.fixture(scope="session")
def processor(tokenizer, assets):
    """The real sample processor of the loader tests (CLIP's image processor), counting the samples it decodes."""
    from helpers.loading import counting_processor

    return counting_processor(tokenizer, assets["clip"])


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, assets, shapes):
    """`reference_run(stage)`: an uninterrupted 2-rank, 6-step run at that ZeRO stage, checkpointed every 3 steps,
    trained once per test run and shared (exact and universal resume compare with it, the ZeRO-2 export reads it)."""
    from helpers.trainer import reference_runs

    return reference_runs(tmp_path_factory, assets, shapes)


@pytest.fixture(scope="session")
def projector_file(tmp_path_factory) -> dict:
    """Random projector weights as a stage-1 run saves them (`file`), and the same under the model's names
    (`expect`)."""
    from helpers.model import write_projector_file

    return write_projector_file(tmp_path_factory.mktemp("projector"))


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory, assets, shapes, projector_file):
    """The run directory of a 2-rank ZeRO-3 run, Qwen2 (tied embeddings) + SigLIP at stage finetune (the tower frozen),
    a stage-1 projector loaded, every-2nd-layer activation checkpointing; 4 steps, checkpoints at 2 and 4. Trained
    once and shared: the model tests check what it trained, the export tests export it."""
    from helpers.model import stage_run

    root = tmp_path_factory.mktemp("finetune")
    return stage_run(root, assets, shapes, "qwen2", "siglip", "finetune", **{
        "model.projector_from": projector_file["file"], "model.activation_checkpointing": "every_k",
        "model.activation_checkpointing_every_k": 2}).parent
