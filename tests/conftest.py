"""Shared fixtures: tiny local models (the `from_pretrained` paths a hub id takes), synthetic shards, and a helper
to run real multi-process training through `pretrain launch`. No network: hub access is switched off."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the real 2-node Slurm cluster fixture)


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


def write_config(path: Path, assets: dict, shapes: dict, llm: str = "llama", vision: str = "clip",
                 **overrides) -> Path:
    """The demo recipe pointed at the test assets, with dotted overrides applied."""
    from pretrain.config import apply_override

    tree = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    tree["run"]["output_dir"] = str(path.parent / "run")
    tree["model"]["llm"], tree["model"]["vision"] = str(assets[llm]), str(assets[vision])
    tree["data"]["train"] = [{"urls": shapes["train"]["urls"]}]
    tree["data"]["val"] = [{"urls": shapes["val"]["urls"]}]
    tree["train"].update(max_steps=6, micro_batch_size=4, log_every=1, val_every=0, warmup_steps=0,
                         progress_bar=False)
    tree["checkpoint"].update(every_steps=0)
    # The demo's tuning (vision lr multiplier, contrastive objective) is not part of the plain test base: tests
    # that want it set it, and stage switches (align) stay valid.
    tree["train"].pop("lr_multipliers", None)
    tree.pop("objectives", None)
    tree["data"].update(num_workers=0, shuffle_buffer=16)
    for key, value in overrides.items():
        apply_override(tree, key.split("."), value)
    path.write_text(yaml.safe_dump(tree))
    return path


def launch(config: Path, nproc: int = 2, overrides: list[str] = (), timeout: int = 300,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`pretrain launch` as a user runs it; fails the test (with the output) on a time-out."""
    cmd = [sys.executable, "-m", "pretrain", "launch", str(config), "--nproc", str(nproc), *overrides]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"training did not finish in {timeout}s:\n{err.stdout}\n{err.stderr}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A plain tar of (key, {ext: bytes}) samples, for hand-made good and bad shards."""
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path
