"""LoRA (`model.lora`, pretrain.model.lora) without ZeRO-3: config errors that name the key, which parameters train
and with which learning rate, the merge formula against PEFT's own merge, QLoRA's CPU refusal, and (one
world-size-1 process) training under ZeRO 0, 1 and 2 with optimizer state for the adapters and projector only.
The 2-rank ZeRO-3 life of an adapter is tests/model/test_lora_zero3.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.runs import ROOT, write_config
from torch import nn

from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.model.build import build_model
from pretrain.model.lora import adapted_components, is_adapter, merged_weight, scaling
from pretrain.model.stages import apply_stage, component_of, param_groups


def _config(tmp_path, assets, shapes, **overrides):
    return load_config(write_config(tmp_path / "c.yaml", assets, shapes, **overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.stage": "align"}, "model.lora.r > 0 with train.stage=align: nothing to adapt"),
    ({"train.stage": "finetune", "model.lora.vision": True}, "model.lora.vision needs train.stage=full"),
    ({"model.lora.quantize": "nf4", "deepspeed.zero_stage": 3}, "model.lora.quantize=nf4 with deepspeed.zero_stage=3"),
    ({"model.lora.target_modules": []}, "model.lora.target_modules"),
    ({"model.lora.quant": "nf4"}, "model.lora.quant: unknown key"),
])
def test_bad_lora_configs_name_the_key(tmp_path, assets, shapes, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        _config(tmp_path, assets, shapes, **{"model.lora.r": 4, **overrides})


def test_targets_matching_nothing_list_the_decoder_linears_and_qlora_needs_a_gpu(assets, tokenizer):
    mcfg = ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"]),
                       lora={"r": 4, "target_modules": ["q_proj", "qkv"]})
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: \['qkv'\] match no linear layer .*"
                                          r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        build_model(mcfg, tokenizer)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.lora.quantize=nf4 needs a CUDA GPU"):
            build_model(mcfg.model_copy(update={"lora": mcfg.lora.model_copy(update={"quantize": "nf4"})}), tokenizer)


def _trainable(model) -> dict[str, set[str]]:
    """Trainable parameter names per component, adapters and base apart."""
    out: dict[str, set[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(component_of(name) + (" lora" if is_adapter(name) else ""), set()).add(name)
    return out


def test_base_frozen_adapters_and_projector_train_with_their_multipliers(assets, tokenizer):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    mcfg = ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"]), lora=lora)
    model = build_model(mcfg, tokenizer)
    apply_stage(model, "finetune", adapted_components(mcfg.lora))
    trainable = _trainable(model)
    assert set(trainable) == {"llm lora", "projector"}, trainable.keys()
    # A and B of q_proj and v_proj in each of the 2 decoder layers; CLIP's q_proj / v_proj are not adapted.
    assert len(trainable["llm lora"]) == 2 * 2 * 2
    assert not any("vision_tower" in n and is_adapter(n) for n, _ in model.named_parameters())
    groups = param_groups(model, 2e-4, 0.0, {"projector": 0.1})
    lrs = {g["name"].removesuffix("_no_decay"): g["lr"] for g in groups}
    assert lrs == {"llm": pytest.approx(2e-4), "projector": pytest.approx(2e-5)}  # LLaVA's mm_projector_lr

    # Stage full with the tower adapted too: its base frozen, its adapters trained; without `vision` it trains whole.
    model = build_model(mcfg.model_copy(update={"lora": mcfg.lora.model_copy(update={"vision": True})}), tokenizer)
    apply_stage(model, "full", adapted_components(model_lora := mcfg.lora.model_copy(update={"vision": True})))
    assert set(_trainable(model)) == {"llm lora", "vision lora", "projector"}
    assert adapted_components(model_lora) == {"llm", "vision"}
    model = build_model(mcfg, tokenizer)
    apply_stage(model, "full", adapted_components(mcfg.lora))
    assert set(_trainable(model)) == {"llm lora", "vision", "projector"}


@pytest.mark.parametrize(("rslora", "dora"), [(False, False), (True, False), (False, True)])
def test_merge_equals_peft_merge(rslora, dora):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from pretrain.config import LoraConfig

    torch.manual_seed(0)
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.0, rslora=rslora, dora=dora)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_rslora=rslora, use_dora=dora))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero: give the adapter something to merge
        if dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    base = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    magnitude = layer.lora_magnitude_vector["default"].weight.detach() if dora else None
    ours = merged_weight(base, a, b, scaling(lcfg), magnitude)
    theirs = model.merge_and_unload()[0].weight.detach()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours, base)


@pytest.mark.slow
def test_zero_0_1_2_train_the_adapters_alike_with_state_for_adapters_and_projector_only(tmp_path, assets, shapes):
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{
        "train.stage": "finetune", "train.max_steps": 2, "train.micro_batch_size": 2, "model.lora.r": 4,
        "train.precision": "fp32", "data.val": [], "model.lora.dropout": 0.0})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "lora_stages_worker.py"), str(cfg),
                           str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT, timeout=400,
                          env={**env, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STAGES "))
    report = {int(k): v for k, v in json.loads(line.removeprefix("STAGES ")).items()}
    for stage, r in report.items():
        assert r["trainable"] and all(is_adapter(n) or "multi_modal_projector" in n for n in r["trainable"]), stage
        # Adam state for exactly the trainable elements (ZeRO-1/2 pad their flat partition a little).
        assert r["numel"] <= r["adam"] <= r["numel"] + 64 * len(r["trainable"]), (stage, r["numel"], r["adam"])
        # fp32: the same update under every stage, so the second step's loss is the same.
        assert r["losses"] == pytest.approx(report[0]["losses"], rel=1e-6), stage
    assert report[0]["losses"][1] != report[0]["losses"][0]
