"""LoRA under DeepSpeed ZeRO-3 on 2 CPU ranks, one run that covers the life of an adapter: a stage-2 run from an
exported Llava (`model.init_from`) on uneven data (one rank's micro-batches have no image: lockstep), every
parameter partitioned, checkpoints at steps 1 and 2, gathers counted (tools/zero3_gathers.py). Then: the optimizer
holds state for the adapters and the projector only; the frozen decoder base is gathered as often as a trained
decoder is (once in the forward and once in the backward of every micro-batch: what full fine-tuning gathers); an
exact resume from step 1 trains to the same loss and the same adapter; the merged export's logits equal the
unmerged model's, and the PEFT adapter directory loads onto the base with PeftModel to the same logits; eval and
generate read both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.export import data_batch, hf_inputs, load_export, training_logits, training_model, val_samples
from helpers.model import consolidated, optimizer_footprint, torchrun, write_unequal_shards
from helpers.runs import ROOT, write_config
from safetensors import safe_open

from pretrain.export.hf import convert

pytestmark = pytest.mark.slow
TOOL = ROOT / "tools" / "zero3_gathers.py"
STEPS, ACCUM = 2, 2


def _base_export(out: Path, assets: dict, tokenizer) -> Path:
    """What a stage-1 `pretrain convert` gives: a Llava directory with tokenizer and processor."""
    from pretrain.config import ModelConfig
    from pretrain.export.hf import processor_from
    from pretrain.model.build import build_model
    from pretrain.model.processing import image_processor_for

    mcfg = ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"]), vision_feature_layer=-1)  # as the recipe
    model = build_model(mcfg, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor_for(mcfg).save_pretrained(out)
    processor_from(out, model.config).save_pretrained(out)
    return out


def _run(root: Path, assets, shapes, urls, *args: str, nproc: int = 2, **overrides) -> dict:
    root.mkdir()
    cfg = write_config(root / "c.yaml", assets, shapes, **{
        "train.stage": "finetune", "train.max_steps": STEPS, "train.grad_accum": ACCUM, "train.micro_batch_size": 2,
        "model.lora.r": 4, "model.lora.alpha": 8, "train.lr_multipliers": {"projector": 0.5},
        "deepspeed.param_persistence_threshold": 0, "data.train": [{"urls": urls}], "data.val": [],
        "data.shuffle_buffer": 1, **overrides})
    out = root / "gathers.json"
    proc = torchrun(TOOL, [str(cfg), "--out", str(out), *args], nproc=nproc, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, assets, shapes, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("lora")
    base = _base_export(root / "base", assets, tokenizer)
    urls = write_unequal_shards(root / "data")
    common = {"model.init_from": str(base)}
    first = _run(root / "a", assets, shapes, urls, "--save", **common, **{"checkpoint.every_steps": 1})
    ckpts = root / "a" / "run" / "checkpoints"
    resumed = _run(root / "b", assets, shapes, urls, "--save", **common, **{
        "checkpoint.resume": str(ckpts / "step_00000001"), "checkpoint.every_steps": 1})
    # Elastic: the 2-rank checkpoint resumed on 1 rank (the same global batch: twice the accumulation).
    elastic = _run(root / "c", assets, shapes, urls, "--save", nproc=1, **common, **{
        "checkpoint.resume": str(ckpts / "step_00000001"), "checkpoint.every_steps": 1,
        "train.grad_accum": 2 * ACCUM})
    return {"base": base, "first": first, "resumed": resumed, "ckpts": ckpts, "run": root / "a" / "run",
            "resumed_ckpts": root / "b" / "run" / "checkpoints", "elastic": elastic,
            "elastic_ckpts": root / "c" / "run" / "checkpoints", "root": root}


def _adapters(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".lora_" in k}


def test_trains_adapters_only_gathers_the_base_as_full_finetuning_and_resumes_exactly(lora_run):
    first, tag = lora_run["first"], lora_run["ckpts"] / "step_00000002"
    # The optimizer holds the adapters and the projector, nothing of the frozen base.
    names, frozen, numel, state = optimizer_footprint(tag)
    assert names and all(".lora_" in n or "multi_modal_projector" in n for n in names), sorted(names)
    assert any("multi_modal_projector" in n for n in names)
    assert all(".lora_" not in n for n in frozen) and any("base_layer" in n for n in frozen)
    assert numel <= state <= numel + 2 * len(names), (numel, state)
    # Every decoder base weight is gathered exactly as often as its layer's norm, a module outside LoRA called once
    # per layer pass (as each linear of a fully fine-tuned decoder is): the adapters add no gathers of the base.
    # The tower runs as a replica (never gathered). Bytes per step, LoRA vs full fine-tuning: benchmarks/RESULTS.md.
    params = first["params"]
    base = {n: c for n, c in params.items() if "language_model" in n and "base_layer" in n}
    assert len(base) == 2 * 7, base
    for name, count in base.items():
        norm = name.split(".self_attn.")[0].split(".mlp.")[0] + ".input_layernorm.weight"
        assert count == params[norm] > 0, (name, count, params[norm])
    assert not any("vision_tower" in n for n in first["params"]), first["params"]
    print(json.dumps(first["per_step"]))
    # Exact resume: the step after the checkpoint trains to the same loss and the same (non-empty) adapter.
    assert len(first["losses"]) == STEPS and lora_run["resumed"]["losses"] == first["losses"][1:]
    a = _adapters(consolidated(tag))
    b = _adapters(consolidated(lora_run["resumed_ckpts"] / "step_00000002"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B of 7 linears in each of 2 layers
    for k in a:
        assert a[k].numel() > 0 and torch.equal(a[k], b[k]), k
    assert all(a[k].abs().sum() > 0 for k in a if ".lora_B." in k)  # trained: B starts at zero


def test_an_elastic_resume_on_one_rank_loads_and_trains_the_adapters(lora_run):
    """The 2-rank checkpoint of step 1 resumed on 1 rank: it goes on from step 1 (one step left), the optimizer
    still holds only adapters and projector, and its adapters moved on from the step-1 ones it loaded."""
    elastic = lora_run["elastic"]
    assert len(elastic["losses"]) == 1 and all(torch.isfinite(torch.tensor(elastic["losses"])))
    tag = lora_run["elastic_ckpts"] / "step_00000002"
    names, _, _, _ = optimizer_footprint(tag)
    assert names and all(".lora_" in n or "multi_modal_projector" in n for n in names), sorted(names)
    start = _adapters(consolidated(lora_run["ckpts"] / "step_00000001"))
    after = _adapters(consolidated(tag))
    assert start.keys() == after.keys() and len(after) == 2 * 7 * 2
    moved = [k for k in after if not torch.equal(start[k], after[k])]
    assert moved and all(after[k].numel() > 0 for k in after)
    # The optimizer state came along (a fresh Adam would count 1 step here).
    osd = torch.load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
    steps = [float(st["step"]) for st in osd["optimizer_state_dict"]["optimizer_state_dict"]["state"].values()]
    assert steps and min(steps) >= 2, steps


def _close(theirs: torch.Tensor, ours: torch.Tensor, batch: dict) -> None:
    """Equal within fp32 tolerance on every real token (the two sides pad rows to different widths)."""
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        torch.testing.assert_close(theirs[row, :n], ours[row, :n], atol=1e-4, rtol=1e-4)


def test_merged_and_adapter_exports_equal_the_unmerged_model(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    run, tag = lora_run["run"], lora_run["ckpts"] / "step_00000002"
    wrapper, tokenizer = training_model(run, {"vlm." + k: v for k, v in consolidated(tag).items()})
    parts = val_samples(2)
    batch = data_batch(run, tokenizer, wrapper.vlm.config, parts)
    unmerged = training_logits(wrapper, batch)
    merged_dir = convert(run, tmp_path / "merged", "fp32")
    merged = load_export(merged_dir)
    inputs = hf_inputs(merged_dir, parts)
    with torch.no_grad():
        theirs = merged(**inputs).logits.float()
    _close(theirs, unmerged, batch)

    adapter_dir = convert(run, tmp_path / "adapter", "fp32", adapter=True)
    assert {p.name for p in adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["modules_to_save"] == ["multi_modal_projector"]
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).numel() > 0 for k in f.keys())
    base = LlavaForConditionalGeneration.from_pretrained(lora_run["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits.float()
    _close(theirs, unmerged, batch)

    # generate reads both exports alike; eval's in-memory load is the merged export.
    from pretrain.eval.loading import load_llava
    from pretrain.export.inference import Captioner, load_image

    image = tmp_path / "a.png"
    image.write_bytes(parts[0]["png"])
    pictures = [load_image(image)]
    assert Captioner(adapter_dir)(pictures, max_new_tokens=6) == Captioner(merged_dir)(pictures, max_new_tokens=6)
    direct = load_llava(tag, torch.device("cpu"), torch.float32)
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(direct.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
