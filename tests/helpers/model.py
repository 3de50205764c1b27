"""Helpers for the model tests: a decoder whose tokenizer lacks <image>/<pad>, a projector file, short runs per
freezing stage, reading DeepSpeed checkpoints back (consolidated weights, what the optimizer holds), shards with
unequal label counts, and a torchrun helper."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.runs import launch, metrics, write_config
from pretrain.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("projector", "llm", "vision")


def write_bare_decoder(out: Path, seed: int = 0) -> tuple[Path, int]:
    """A Llama whose tokenizer has neither <image> nor <pad>, with embeddings off-centre like trained ones (a common
    offset), so rows set to the mean differ clearly from a random or zero initialisation. Returns (dir, vocab)."""
    from transformers import AutoModelForCausalLM

    from pretrain.demo import tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer, write_tiny_decoder

    bare = build_tokenizer(tokenizer_corpus(), vocab_size=400, image_and_pad=False)
    write_tiny_decoder(out, bare, "llama", seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            m.weight.add_(0.1 * torch.randn(m.weight.shape[1], generator=g))
    model.save_pretrained(out)
    return out, len(bare)


def write_projector_file(root: Path) -> dict:
    """Random projector weights for tiny towers/decoders of width 64, as a stage-1 run would save them; `expect`
    holds them under the names the built model gives them."""
    g = torch.Generator().manual_seed(7)
    shapes = {"linear_1.weight": (64, 64), "linear_1.bias": (64,), "linear_2.weight": (64, 64), "linear_2.bias": (64,)}
    weights = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file({f"multi_modal_projector.{k}": v for k, v in weights.items()}, root / "projector.safetensors")
    save_file({f"model.multi_modal_projector.{k}": v for k, v in weights.items()}, root / "expect.safetensors")
    return {"file": str(root / "projector.safetensors"), "expect": str(root / "expect.safetensors")}


def stage_run(root: Path, assets: dict, shapes: dict, llm: str, vision: str, stage: str, **overrides) -> Path:
    """A 2-rank run of 4 steps at a freezing stage, checkpoints at steps 2 and 4; returns its checkpoints folder."""
    cfg = write_config(root / "c.yaml", assets, shapes, llm=llm, vision=vision, **{
        "train.stage": stage, "train.max_steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
        **overrides})
    out = launch(cfg, nproc=2, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = metrics(root / "run")
    assert all(math.isfinite(r["loss"]) for r in rows)
    return root / "run" / "checkpoints"


def check_grown_rows(weight: torch.Tensor, old_rows: int) -> None:
    """New rows: the mean of the old ones (transformers adds noise of 1e-9 x covariance), not a random init."""
    old, new = weight[:old_rows].float(), weight[old_rows:].float()
    mean = old.mean(0)
    assert new.shape[0] > 0 and (new - mean).abs().max() < 1e-3
    assert mean.norm() > 0.5  # the offset is there, so neither zeros nor N(0, 0.02) rows would pass
    assert (new - mean).norm(dim=1).max() < 0.01 * (old - mean).norm(dim=1).min()


def component(name: str) -> str:
    from pretrain.model.stages import component_of

    return component_of(name)


# -- DeepSpeed checkpoints ----------------------------------------------------------------------------------------
def consolidated(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a committed checkpoint, frozen ones included, named as in the Llava model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k.removeprefix("vlm."): v for k, v in sd.items() if k.startswith("vlm.")}


def optimizer_footprint(tag_dir: Path) -> tuple[set[str], set[str], int, int]:
    """(names the optimizer holds, frozen names, their element count, Adam state elements summed over ranks)."""
    ranks = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    model = torch.load(ranks[0], map_location="cpu", weights_only=False)
    trained = {k.removeprefix("vlm."): shape for group in model["param_shapes"] for k, shape in group.items()}
    frozen = {k.removeprefix("vlm.") for k in model["frozen_param_shapes"] or {}}
    state = 0
    for path in sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        osd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for s in osd["optimizer_state_dict"]["state"].values():
            state += s["exp_avg"].numel()
    return set(trained), frozen, sum(shape.numel() for shape in trained.values()), state


def check_stage(before: dict, after: dict, tag_dir: Path, trained: set[str], world: int = 2) -> None:
    """Trained components moved, frozen ones did not; the optimizer holds state for the trained ones only."""
    moved = {component(k) for k in after if not torch.equal(before[k], after[k])}
    assert moved == trained, f"changed: {moved}, expected {trained}"
    names, frozen, numel, state = optimizer_footprint(tag_dir)
    assert {component(k) for k in names} == trained
    assert {component(k) for k in frozen} == set(COMPONENTS) - trained
    # ZeRO-3 pads each parameter's partition to a multiple of the world size; nothing else is there.
    assert numel <= state <= numel + world * len(names), (numel, state)


# -- data ---------------------------------------------------------------------------------------------------------
LONG_CAPTION = ("a small red circle sits at the top left of the picture while two large blue squares and a green "
                "triangle share the bottom right corner of a plain white background")


def write_unequal_shards(out: Path) -> list[str]:
    """Two shards of 4 samples: captioned images with long captions, and text-only conversations with very short
    answers. With two ranks each reads one shard (whole shards go to ranks when there are enough of them), so one
    rank sees only text and the label counts differ about tenfold."""
    from pretrain.shards.synthetic import make_sample
    from pretrain.shards.writer import ShardWriter, write_manifest

    with ShardWriter(out, samples_per_shard=4) as writer:
        for i in range(4):
            sample = make_sample("train", i)
            writer.write({"__key__": f"img-{i}", "png": sample["png"], "txt": LONG_CAPTION,
                          "json": json.dumps({"caption": f"{LONG_CAPTION} number {i}"})})
        for i in range(4):
            turns = [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": "yes"}]
            writer.write({"__key__": f"text-{i}", "json": json.dumps({"conversations": turns})})
    write_manifest(out, writer.shards)
    return [str(out / s["url"]) if not Path(s["url"]).is_absolute() else s["url"] for s in writer.shards]


# -- processes ----------------------------------------------------------------------------------------------------
def torchrun(script: Path, args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script.name} did not finish in {timeout}s:\n{err.stdout}\n{err.stderr}")
