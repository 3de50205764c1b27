"""The model under DeepSpeed ZeRO-3 on 2 CPU ranks: partitioned builds that load what they should (whole exports,
a projector file, grown embeddings), and real training runs per freezing stage with Llama/Qwen2 decoders and
CLIP/SigLIP towers (each decoder, tower and stage at least once), a text-only rank, and unequal label counts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.model import (
    ROOT,
    check_grown_rows,
    check_stage,
    consolidated,
    stage_run,
    torchrun,
    write_bare_decoder,
    write_unequal_shards,
)
from helpers.runs import launch, metrics, write_config
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

from pretrain.config import ModelConfig
from pretrain.model.build import build_model

pytestmark = pytest.mark.slow
WORKER = ROOT / "tests" / "helpers" / "zero3_build_worker.py"


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> tuple:
    return write_bare_decoder(tmp_path_factory.mktemp("bare") / "llama")


def _export(out, assets, tokenizer) -> dict:
    """An exported Llava whose weights a fresh build could not produce (shifted by 1), and what it must hold."""
    model = build_model(ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"])), tokenizer)
    names = ["model.multi_modal_projector.linear_1.weight", "model.language_model.layers.1.mlp.up_proj.weight",
             "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(1.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: params[k].detach().clone() for k in names}, out / "expect.safetensors")
    return {"dir": str(out), "expect": str(out / "expect.safetensors")}


def test_zero3_builds_load_exports_projectors_and_grown_embeddings(tmp_path, assets, tokenizer, bare,
                                                                   projector_file):
    """Built partitioned (no rank holds any parameter's data outside a gather), then gathered: equal to the same
    model built without DeepSpeed, and holding the values of the files they were loaded from."""
    export = _export(tmp_path / "export", assets, tokenizer)
    cases = {
        "export": {"model": {"llm": str(assets["qwen2"]), "vision": str(assets["siglip"]), "init_from": export["dir"]},
                   "expect_file": export["expect"]},
        "projector": {"model": {"llm": str(assets["qwen2"]), "vision": str(assets["siglip"]),
                                "projector_from": projector_file["file"]},
                      "expect_file": projector_file["expect"]},
        "resize": {"model": {"llm": str(bare[0]), "vision": str(assets["clip"])}},
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(tmp_path / "report.json")}))
    out = torchrun(WORKER, [str(spec)], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    for name, result in report.items():
        assert result["holding_data"] == [], name
        assert result["differ"] == [], name
        assert result.get("unlike_file", []) == [], name
    embeddings = torch.load(report["resize"]["embeddings"])
    assert report["resize"]["rows"] % 64 == 0 and report["resize"]["rows"] > bare[1]
    check_grown_rows(embeddings["embed"], bare[1])
    check_grown_rows(embeddings["lm_head"], bare[1])


# -- training per stage -------------------------------------------------------------------------------------------
def _initial(assets: dict, llm: str, vision: str) -> dict[str, torch.Tensor]:
    """The pretrained weights as named in the Llava model (projector excluded: it is random-init)."""
    out = {f"model.vision_tower.{k}": v for k, v in AutoModel.from_pretrained(assets[vision]).state_dict().items()}
    decoder = AutoModelForCausalLM.from_pretrained(assets[llm]).state_dict()
    out.update({"model.language_model." + k.removeprefix("model."): v for k, v in decoder.items()
                if k.startswith("model.")})
    out["lm_head.weight"] = decoder["lm_head.weight"]
    return out


def test_align_trains_the_projector_only_and_grows_a_bare_tokenizer(tmp_path, assets, shapes, bare):
    """Llama (its tokenizer lacks <image> and <pad>) + CLIP, stage align."""
    ckpts = stage_run(tmp_path, {**assets, "bare": bare[0]}, shapes, "bare", "clip", "align")
    first, last = consolidated(ckpts / "step_00000002"), consolidated(ckpts / "step_00000004")
    check_stage(first, last, ckpts / "step_00000004", {"projector"})
    initial = _initial({"bare": bare[0], "clip": assets["clip"]}, "bare", "clip")
    for k, v in initial.items():  # frozen: exactly what was loaded (the grown vocabulary rows follow the old ones)
        assert torch.equal(last[k][: v.shape[0]], v), k
    check_grown_rows(last["model.language_model.embed_tokens.weight"], bare[1])
    check_grown_rows(last["lm_head.weight"], bare[1])


def test_finetune_trains_projector_and_decoder_with_activation_checkpointing(finetune_run, assets):
    """Qwen2 (tied embeddings) + SigLIP, stage finetune, a stage-1 projector loaded, every-2nd-layer checkpointing
    (the shared run of conftest's `finetune_run`, which the export tests export too)."""
    ckpts = finetune_run / "checkpoints"
    first, last = consolidated(ckpts / "step_00000002"), consolidated(ckpts / "step_00000004")
    check_stage(first, last, ckpts / "step_00000004", {"projector", "llm"})
    for k, v in _initial(assets, "qwen2", "siglip").items():
        if k.startswith("model.vision_tower."):
            assert torch.equal(last[k], v), k


def _full_run(tmp_path, assets, shapes, urls, nproc, grad_accum, steps):
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, llm="llama", vision="siglip", **{
        "train.stage": "full", "train.max_steps": steps, "train.grad_accum": grad_accum, "data.shuffle_buffer": 1,
        "checkpoint.every_steps": 1, "data.train": [{"urls": urls}], "data.val": []})
    out = launch(cfg, nproc=nproc, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return metrics(tmp_path / "run"), tmp_path / "run" / "checkpoints"


def _images_per_rank(config) -> list[int]:
    """Images in each rank's first micro-batch, from the run's own config through the trainer's loader."""
    from pretrain.config import load_config
    from pretrain.model.processing import build_processing
    from pretrain.train.engine import make_loader

    cfg = load_config(config)
    processing = build_processing(cfg)
    counts = []
    for rank in range(2):
        loader = make_loader(cfg, cfg.data.train, processing.processor, processing.tokenizer.pad_token_id, rank, 2,
                             train=True)
        px = next(iter(loader))["pixel_values"]
        counts.append(0 if px is None else px.shape[0])
    return counts


def test_full_stage_text_only_rank_and_loss_over_the_global_batch(tmp_path, assets, shapes):
    """Llama + SigLIP, stage full. One rank's micro-batch has no image (no ZeRO-3 hang: the run finishes), and the
    ranks' label counts differ ~10x: the step's loss and gradient norm equal those of one rank taking both
    micro-batches, i.e. the loss is averaged over the global batch's label tokens, not over per-rank means."""
    urls = write_unequal_shards(tmp_path / "data")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two, ckpts = _full_run(tmp_path / "two", assets, shapes, urls, nproc=2, grad_accum=1, steps=2)
    assert sorted(_images_per_rank(tmp_path / "two" / "c.yaml")) == [0, 4]  # the case occurred: a rank saw no image
    one, _ = _full_run(tmp_path / "one", assets, shapes, urls, nproc=1, grad_accum=2, steps=1)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    first, last = consolidated(ckpts / "step_00000001"), consolidated(ckpts / "step_00000002")
    check_stage(first, last, ckpts / "step_00000002", {"projector", "llm", "vision"})
