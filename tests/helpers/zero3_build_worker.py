"""Run under torchrun (2 ranks, gloo): build each model of a spec under ZeRO-3 and compare it with the same model
built without DeepSpeed. Rank 0 writes one JSON report; the test asserts on it.

Per case: how many parameters still hold data outside a gather (0: everything is partitioned), the names whose
gathered values differ from the plain build, and those that differ from the values in the case's `expect_file`.
"""

from __future__ import annotations

import json
import sys

import torch


def plain_build(model_cfg, tokenizer):
    from pretrain.model.build import build_model

    return {k: v.detach().clone() for k, v in build_model(model_cfg, tokenizer).named_parameters()}


def zero3_build(model_cfg, tokenizer, ds_config):
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.model.build import ZeroContext, build_model

    keep = HfDeepSpeedConfig(ds_config)  # transformers partitions what it builds while this lives
    model = build_model(model_cfg, tokenizer, ZeroContext(ds_config))
    del keep
    return model


def compare(model, reference: dict[str, torch.Tensor]) -> dict:
    import deepspeed

    params = dict(model.named_parameters())
    holding = [k for k, p in params.items() if p.numel() > 0]
    differ, gathered = [], {}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        for k, p in params.items():
            gathered[k] = p.detach().clone()
            if k not in reference or reference[k].shape != p.shape or not torch.allclose(reference[k], p, atol=1e-6):
                differ.append(k)
    return {"holding_data": holding, "differ": differ, "n_params": len(params)}, gathered


def main(spec_path: str) -> None:
    from pretrain import distributed
    from pretrain.config import ModelConfig
    from pretrain.model.build import load_tokenizer

    spec = json.loads(open(spec_path).read())
    rank, world, _ = distributed.init(5)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3},
                 "bf16": {"enabled": False}}
    report = {}
    for name, case in spec["cases"].items():
        model_cfg = ModelConfig(**case["model"])
        tokenizer = load_tokenizer(model_cfg)
        reference = plain_build(model_cfg, tokenizer)
        result, gathered = compare(zero3_build(model_cfg, tokenizer, ds_config), reference)
        if "expect_file" in case:  # values the model must hold, by parameter name
            from safetensors.torch import load_file

            want = load_file(case["expect_file"])
            result["unlike_file"] = [k for k, v in want.items() if not torch.equal(gathered[k], v)]
        emb = gathered["model.language_model.embed_tokens.weight"]
        result["rows"] = emb.shape[0]
        result["embeddings"] = f"{spec['out']}.{name}.pt"
        if rank == 0:
            torch.save({"embed": emb, "lm_head": gathered.get("lm_head.weight", emb)}, result["embeddings"])
        report[name] = result
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(report, f)
    distributed.finish(0)


if __name__ == "__main__":
    main(sys.argv[1])
