"""ZeRO-3 lockstep on uneven data: 2 ranks train the same VLM (alignment objectives on) on micro-batches that differ
in every way that could make their collectives differ, and on even ones for comparison.

Cases (each `--steps` optimizer steps):
  even    both ranks: images + captions of `--long` label tokens
  uneven  rank 0: images + captions of `--long` label tokens (more than one loss chunk);
          rank 1: text only, `--short` label tokens (below one chunk), so no image and no pair
  empty   rank 0 as in uneven; rank 1: text only with no label token at all
  flex    flex_attention's training path against sdpa: two engines of the same seeded model (alignment off,
          non-reentrant activation checkpointing on every layer), one packed micro-batch per rank (different
          samples and row layouts on each), one forward + backward: the losses and every parameter's full
          gradient (gathered from ZeRO-3's partitions) must agree; and the flex loss on a batch whose boundaries
          merge the packed samples must not (so the comparison can fail). On a CPU flex runs its own unfused
          implementation (pretrain.bench.device_check.flex_backward_on_cpu: torch has no CPU backward for it).

    python tools/zero3_lockstep.py [--long 2000 --short 40 --chunk 1024 --steps 2]   (prints a table)

It starts 2 ranks itself (torchrun) on tiny random models it writes, or runs as one of them (under torchrun, with
`--llm/--vision` directories and `--out`): then every rank writes `OUT.rank<R>.json` with its label counts, images,
pairs and the seconds each case took (and the flex case's differences).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.model.loss import LOSS_CHUNK

ROOT = Path(__file__).resolve().parents[1]


def _samples(cfg, rank: int, case: str, args: argparse.Namespace) -> list:
    """Two samples (one per row) for this rank and case: token ids drawn from the vocabulary."""
    from pretrain.data.sample import ProcessedSample
    from pretrain.tokens import IGNORE

    g = torch.Generator().manual_seed(100 * rank + len(case))
    text_cfg, size = cfg.text_config, cfg.vision_config.image_size
    words = [t for t in range(text_cfg.vocab_size) if t not in (cfg.image_token_id, text_cfg.pad_token_id)]

    def tokens(n: int) -> list[int]:
        return [words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)]

    def sample(image: bool, labels: int, prompt: int = 4) -> ProcessedSample:
        head = [text_cfg.bos_token_id] + ([cfg.image_token_id] * cfg.image_seq_length if image else []) + tokens(prompt)
        body = tokens(labels)
        pixels = torch.randn(3, size, size, generator=g) if image else None
        return ProcessedSample(head + body, [IGNORE] * len(head) + body, pixels)

    if case == "even" or rank == 0:
        return [sample(True, args.long), sample(True, args.long - 7)]
    if case == "uneven":
        return [sample(False, args.short), sample(False, args.short // 2)]
    return [sample(False, 0), sample(False, 0)]  # empty: no label token on this rank


def _engine(args: argparse.Namespace, world: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.config import ModelConfig, ObjectivesConfig
    from pretrain.model.build import ZeroContext, build_model, load_tokenizer
    from pretrain.model.stages import apply_stage
    from pretrain.model.vlm import VLMForTraining

    ds_config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * world, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "zero_force_ds_cpu_optimizer": False}
    mcfg = ModelConfig(llm=args.llm, vision=args.vision)
    tokenizer = load_tokenizer(mcfg)
    keep = HfDeepSpeedConfig(ds_config)  # transformers builds partitioned while this lives
    model = build_model(mcfg, tokenizer, ZeroContext(ds_config))
    apply_stage(model, "full")
    module = VLMForTraining(model, ObjectivesConfig(contrastive_weight=0.5, itm_weight=0.5))
    module.loss_chunk = args.chunk
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    del keep
    return engine, model.config


def _attention_engine(args: argparse.Namespace, world: int, impl: str):
    """A plain (no alignment) ZeRO-3 engine of the seeded model with attention `impl`, checkpointing every layer."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.config import ModelConfig
    from pretrain.model.build import ZeroContext, build_model, load_tokenizer
    from pretrain.model.checkpointing import enable_activation_checkpointing
    from pretrain.model.stages import apply_stage
    from pretrain.model.vlm import VLMForTraining

    ds_config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * world,
                 "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False}
    mcfg = ModelConfig(llm=args.llm, vision=args.vision, attn_implementation=impl)
    tokenizer = load_tokenizer(mcfg)
    keep = HfDeepSpeedConfig(ds_config)
    model = build_model(mcfg, tokenizer, ZeroContext(ds_config), seed=0)
    apply_stage(model, "full")
    enable_activation_checkpointing(model, "full")
    module = VLMForTraining(model).train()  # from_pretrained leaves eval mode; transformers' flex follows the mode
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)  # never steps
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    del keep
    return engine, model.config, tokenizer.pad_token_id


def flex_case(args: argparse.Namespace, rank: int, world: int) -> dict:
    """flex_attention vs sdpa under ZeRO-3 on packed rows: see the module docstring."""
    from deepspeed.utils import safe_get_full_grad

    from pretrain.bench.device_check import flex_backward_on_cpu, packed_and_alone, samples

    losses, grads = {}, {}
    with flex_backward_on_cpu(torch.device("cpu")):
        for impl in ("sdpa", "flex_attention"):
            engine, cfg, pad = _attention_engine(args, world, impl)
            lengths = (23, 14, 17) if rank == 0 else (9, 30, 12)  # other samples and row layouts on each rank
            batch = packed_and_alone(samples(cfg, lengths, seed=rank), pad)[0]
            loss, _ = engine(batch)
            engine.backward(loss)
            losses[impl] = float(loss.detach())
            grads[impl] = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
            if impl == "flex_attention":
                merged = {**batch, "sample_lengths": [[sum(row)] for row in batch["sample_lengths"]]}
                with torch.no_grad():
                    losses["flex_merged"] = float(engine(merged)[0])
    flat = {impl: torch.cat([g.reshape(-1).float() for g in grads[impl].values()]) for impl in grads}
    grad_diff = float((flat["flex_attention"] - flat["sdpa"]).norm() / flat["sdpa"].norm())
    return {"losses": losses, "grad_rel_diff": grad_diff, "parameters": len(grads["sdpa"]),
            "loss_rel_diff": abs(losses["flex_attention"] - losses["sdpa"]) / abs(losses["sdpa"]),
            "merged_rel_diff": abs(losses["flex_merged"] - losses["sdpa"]) / abs(losses["sdpa"])}


def run_rank(args: argparse.Namespace) -> None:
    from pretrain import distributed
    from pretrain.data.batching import collate

    rank, world, _ = distributed.init(args.collective_timeout_minutes)
    engine, cfg = _engine(args, world)
    pad = cfg.text_config.pad_token_id
    report: dict = {"rank": rank, "chunk": args.chunk, "cases": {}}
    for case in args.cases.split(","):
        if case == "flex":
            start = time.perf_counter()
            report["cases"]["flex"] = flex_case(args, rank, world) | {"seconds": time.perf_counter() - start}
            continue
        batch = collate([[s] for s in _samples(cfg, rank, case, args)], pad)
        images = 0 if batch["pixel_values"] is None else int(batch["pixel_values"].shape[0])
        losses, start = [], time.perf_counter()
        for _ in range(args.steps):
            loss, n = engine(batch)
            engine.backward(loss / max(int(n), 1))
            engine.step()
            losses.append(float(loss.detach()))
        report["cases"][case] = {"labels": batch["n_labels"], "images": images, "pairs": len(batch["image_texts"]),
                                 "seconds": time.perf_counter() - start, "losses": losses}
        print(f"rank {rank}: {case} done, {report['cases'][case]['seconds']:.1f} s", file=sys.stderr, flush=True)
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(report))
    distributed.finish(0)


def launch(args: argparse.Namespace) -> int:
    """Write tiny models, start 2 ranks on them, print what each case cost."""
    from pretrain.demo import tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer, write_tiny_decoder, write_tiny_vision

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(tokenizer_corpus(), vocab_size=400)
        llm = write_tiny_decoder(root / "llm", tok, "llama", max_position_embeddings=2 * args.long + 512)
        vision = write_tiny_vision(root / "vision", "siglip")
        out = root / "report"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(Path(__file__).resolve()), "--llm", str(llm), "--vision", str(vision), "--out", str(out),
               "--long", str(args.long), "--short", str(args.short), "--chunk", str(args.chunk),
               "--steps", str(args.steps), "--cases", args.cases]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        ranks = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = ranks.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(ranks.pid, signal.SIGKILL)  # torchrun and both ranks: they would run on orphaned
            ranks.wait()
            print(f"no result in {args.timeout} s: the ranks hung (out of lockstep) or the machine is too slow")
            return 1
        if code != 0:
            print(f"the ranks failed (exit {code})")
            return code
        reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    print(f"{'case':8} {'labels r0/r1':>14} {'images r0/r1':>13} {'s/step':>7}")
    for case in args.cases.split(","):
        c = [r["cases"][case] for r in reports]
        if case == "flex":
            print("flex vs sdpa: " + ", ".join(f"rank {r}: loss {x['loss_rel_diff']:.1e}, gradients "
                                               f"{x['grad_rel_diff']:.1e}" for r, x in enumerate(c)))
            continue
        per_step = max(x["seconds"] for x in c) / args.steps
        print(f"{case:8} {c[0]['labels']:>7}/{c[1]['labels']:<6} {c[0]['images']:>6}/{c[1]['images']:<6} "
              f"{per_step:7.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm"), p.add_argument("--vision"), p.add_argument("--out")
    p.add_argument("--long", type=int, default=2000, help="label tokens of a long caption")
    p.add_argument("--short", type=int, default=40, help="label tokens of a short text")
    p.add_argument("--chunk", type=int, default=LOSS_CHUNK, help="label rows per loss chunk")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cases", default="even,uneven,empty,flex")
    p.add_argument("--timeout", type=int, default=600, help="seconds before the launcher calls it a hang")
    p.add_argument("--collective-timeout-minutes", type=int, default=3)
    args = p.parse_args()
    if "RANK" in os.environ:
        run_rank(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
