"""`pretrain plan` knows LoRA (pretrain.plan.lora): the adapter parameters it counts are those PEFT adds to the
built model, and only adapters and projector carry gradients and optimizer state in its memory table."""

from __future__ import annotations

import pytest

from pretrain.config import ModelConfig
from pretrain.model.build import build_model
from pretrain.model.flops import count_params
from pretrain.model.lora import is_adapter
from pretrain.plan.lora import lora_counts
from pretrain.plan.shapes import model_shape


@pytest.mark.parametrize("lora", [{"r": 4}, {"r": 8, "target_modules": ["q_proj", "down_proj"], "dora": True},
                                  {"r": 2, "vision": True}])
def test_adapter_count_equals_the_built_models(assets, tokenizer, lora):
    mcfg = ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"]), lora=lora)
    built = sum(p.numel() for n, p in build_model(mcfg, tokenizer).named_parameters() if is_adapter(n))
    shape = model_shape(mcfg)
    counts = lora_counts(shape, mcfg.lora, "full")
    assert counts.adapters == built > 0
    params = count_params(shape)
    assert counts.frozen_base == params.llm + (params.vision if lora.get("vision") else 0)


def test_only_adapters_and_projector_carry_optimizer_state(tmp_path, assets, shapes):
    from helpers.runs import write_config

    from pretrain.config import load_config
    from pretrain.plan.planner import make_plan

    cfg = load_config(write_config(tmp_path / "c.yaml", assets, shapes, **{
        "train.stage": "finetune", "model.lora.r": 4, "train.precision": "bf16"}))
    plan = make_plan(cfg, n_gpus=8, gpu="a100-40gb")
    trained = plan.work.lora.adapters + plan.params.projector
    assert plan.work.trained_params(plan.params) == trained
    assert plan.by_stage[3].optimizer == pytest.approx(12 * trained / 8)
    assert plan.by_stage[0].grads == pytest.approx(2 * trained)
    full = make_plan(cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora": ModelConfig(
        llm="x", vision="y").lora})}), n_gpus=8, gpu="a100-40gb")
    assert full.by_stage[3].optimizer == pytest.approx(12 * (plan.params.llm + plan.params.projector) / 8)
