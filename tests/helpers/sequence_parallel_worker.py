"""One rank of the sequence-parallel check (tests/train/test_sequence_parallel.py), under torchrun.

Two ZeRO-3 engines of the same seeded tiny VLM (plain SGD at learning rate 1, no clipping, so one update is minus
the gradient): the reference without sequence parallelism, then one with deepspeed.sequence_parallel_size =
`--sp`. Each takes one `train_step` on the same global batch (packed rows and a padded row, with images, a width
that N does not divide); with several groups, each group gets its own samples (uneven label counts), and the
reference's ranks read them as the data-parallel ranks would. Written to OUT.rank<R>.json: the step losses, the
largest relative parameter difference after the update, and the label counts of this rank's shard.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEED_BASE = 11


def build(args: argparse.Namespace, world: int, sp: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.config import ModelConfig
    from pretrain.model.build import ZeroContext, build_model, load_tokenizer
    from pretrain.model.stages import apply_stage
    from pretrain.model.vlm import VLMForTraining
    from pretrain.train.engine import sequence_parallel

    dp = world // sp
    ds_config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * dp,
                 "zero_optimization": {"stage": args.stage},
                 "gradient_clipping": 0.0,
                 "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
                 **({"sequence_parallel_size": sp} if sp > 1 else {})}
    mcfg = ModelConfig(llm=args.llm, vision=args.vision, image_tiling=args.tiling)
    tokenizer = load_tokenizer(mcfg)
    keep = HfDeepSpeedConfig(ds_config)
    model = build_model(mcfg, tokenizer, ZeroContext(ds_config), seed=0)
    apply_stage(model, "full")
    module = VLMForTraining(model)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    mpu = sequence_parallel(sp, 2, model, module)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu)
    del keep
    return engine, model.config, tokenizer.pad_token_id


def batch_for(cfg, pad: int, group: int) -> dict:
    """Two rows: two packed samples, and one sample + pad; an odd width (N must pad it); other samples per group."""
    from pretrain.bench.device_check import samples
    from pretrain.data.batching import collate

    for first in (9, 10):  # the first sample one token longer where that makes the width odd
        lengths = (first, 14, 6) if group == 0 else (first - 4, 20, 11)
        items = samples(cfg, lengths, seed=SEED_BASE + group)
        batch = collate([items[:2], items[2:]], pad, pad_to_multiple=1)
        if batch["input_ids"].shape[1] % 2:
            return batch
    raise AssertionError("no odd width")


def one_step(engine, batch: dict, world: int, sp: int) -> float:
    from pretrain.model.sequence_parallel import gradient_divisor
    from pretrain.train.step import train_step

    divisor = gradient_divisor(engine.zero_optimization_stage(), world, sp)
    return train_step(engine, [batch], divisor, torch.device("cpu"), read_grad_norm=False).loss


def parameters(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def main() -> None:
    from pretrain import distributed
    from pretrain.model.sequence_parallel import shard_batch

    p = argparse.ArgumentParser()
    p.add_argument("--llm"), p.add_argument("--vision"), p.add_argument("--out")
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--tiling", default="none")
    p.add_argument("--stage", type=int, default=3)
    args = p.parse_args()
    rank, world, _ = distributed.init(2)
    group = rank // args.sp  # the data-parallel rank: the samples this rank's group reads

    reference, cfg, pad = build(args, world, 1)
    batch = batch_for(cfg, pad, group)
    # Without sequence parallelism every rank is a data-parallel rank: rank r reads group r // N's samples, so
    # the global batch holds each group's samples N times; the mean loss and its gradient are the same.
    ref_before = parameters(reference)
    ref_loss = one_step(reference, batch, world, 1)
    ref_after = parameters(reference)

    engine, _, _ = build(args, world, args.sp)
    before = parameters(engine)
    shard = shard_batch(batch, engine.module.sequence_parallel)
    loss = one_step(engine, batch, world, args.sp)
    after = parameters(engine)

    start_diff = max(float((before[n] - ref_before[n]).abs().max()) for n in before)
    ref_deltas = {n: ref_after[n] - ref_before[n] for n in before}
    deltas = {n: after[n] - before[n] for n in before}
    scale = torch.cat([d.reshape(-1) for d in ref_deltas.values()]).norm()
    # Each parameter's update against the reference's, relative to its own size or, for the parameters whose exact
    # gradient is zero (the attention keys' biases: softmax ignores them) and which hold rounding noise, to a
    # ten-thousandth of the whole update.
    worst = max(float((deltas[n] - ref_deltas[n]).norm() / torch.maximum(ref_deltas[n].norm(), 1e-4 * scale))
                for n in before)
    report = {"rank": rank, "ref_loss": ref_loss, "loss": loss, "start_diff": start_diff, "grad_rel_diff": worst,
              "parameters": len(before), "shard_labels": shard["n_labels"], "labels": batch["n_labels"],
              "width": int(batch["input_ids"].shape[1])}
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(report))
    distributed.finish(0)


if __name__ == "__main__":
    main()
