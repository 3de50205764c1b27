"""Memory per rank of one training step at growing sequence lengths, with Ulysses sequence parallelism over N ranks
(deepspeed.sequence_parallel_size) against none, on CPU ranks (gloo).

A tiny Llama-style VLM (a SigLIP tower, one image per row) under ZeRO-3, built and run by the product's own code
(pretrain.train.engine.sequence_parallel, VLMForTraining, train_step). For each row width L (one packed row of two
samples), one optimizer step; per rank it records:
  saved    bytes of the tensors autograd saved for backward during the forward (torch.autograd.graph
           saved_tensors_hooks: each saved tensor's numel x element size, views of one storage counted once), the
           activation-memory proxy that does not depend on the allocator;
  rss      the process's peak resident set (ru_maxrss) after the step, a host-memory proxy (monotone: lengths run in
           ascending order, so it is the peak up to that length).
`--budget-mib`: the longest L whose saved bytes fit that budget on every rank.

    python tools/bench_sequence_parallel.py --sizes 1,2,4 --lengths 1024,2048,4096,8192 [--budget-mib 64]

It writes tiny models to a temporary folder and starts `torchrun` per N (N ranks, one group); prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _saved_bytes(step) -> int:
    """Bytes autograd saves during `step()`'s forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _engine(args: argparse.Namespace, size: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.config import ModelConfig
    from pretrain.model.build import ZeroContext, build_model, load_tokenizer
    from pretrain.model.stages import apply_stage
    from pretrain.model.vlm import VLMForTraining
    from pretrain.train.engine import sequence_parallel

    ds_config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 3},
                 "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                 **({"sequence_parallel_size": size} if size > 1 else {})}
    mcfg = ModelConfig(llm=args.llm, vision=args.vision)
    keep = HfDeepSpeedConfig(ds_config)
    model = build_model(mcfg, load_tokenizer(mcfg), ZeroContext(ds_config), seed=0)
    apply_stage(model, "full")
    module = VLMForTraining(model)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    mpu = sequence_parallel(size, 1, model, module)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu)
    del keep
    return engine, model.config, model.config.text_config.pad_token_id


def _row(cfg, pad: int, width: int) -> dict:
    """One packed row `width` tokens wide: two samples with an image each, labels on their text."""
    from pretrain.bench.device_check import samples
    from pretrain.data.batching import collate

    image = cfg.image_seq_length + 3  # bos + image tokens + 2 prompt tokens
    half = width // 2 - image
    items = samples(cfg, (half, width - 2 * image - half, 1), seed=0)
    return collate([items[:2]], pad, pad_to_multiple=1)


def run_rank(args: argparse.Namespace) -> None:
    from pretrain import distributed
    from pretrain.model.sequence_parallel import gradient_divisor
    from pretrain.train.step import train_step

    rank, world, _ = distributed.init(10)
    engine, cfg, pad = _engine(args, world)
    divisor = gradient_divisor(3, world, world)
    rows = []
    for width in (int(x) for x in args.lengths.split(",")):
        batch = _row(cfg, pad, width)
        saved = _saved_bytes(lambda b=batch: train_step(engine, [b], divisor, torch.device("cpu"),
                                                        read_grad_norm=False))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append({"length": width, "saved": saved, "rss": rss})
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(rows))
    distributed.finish(0)


def launch(args: argparse.Namespace) -> int:
    from pretrain.demo import tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer, write_tiny_decoder, write_tiny_vision

    longest = max(int(x) for x in args.lengths.split(","))
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(tokenizer_corpus(), vocab_size=400)
        llm = write_tiny_decoder(root / "llm", tok, "llama", max_position_embeddings=longest + 64)
        vision = write_tiny_vision(root / "vision", "siglip")
        for size in (int(x) for x in args.sizes.split(",")):
            out = root / f"n{size}"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={size}", "--standalone",
                   str(Path(__file__).resolve()), "--llm", str(llm), "--vision", str(vision), "--out", str(out),
                   "--lengths", args.lengths]
            done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-3000:], done.stderr[-3000:])
                return done.returncode
            ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(size)]
            table[size] = [max(rows, key=lambda r: r["saved"]) for rows in zip(*ranks)]  # the worst rank
    mib = 2**20
    print(f"{'L':>7} " + " ".join(f"{'N=' + str(n) + ' saved MiB':>16} {'rss MiB':>8}" for n in table))
    for i, length in enumerate(int(x) for x in args.lengths.split(",")):
        print(f"{length:>7} " + " ".join(f"{table[n][i]['saved'] / mib:>16.1f} {table[n][i]['rss'] / mib:>8.0f}"
                                         for n in table))
    for n, rows in table.items():
        fits = [r["length"] for r in rows if r["saved"] <= args.budget_mib * mib]
        print(f"N={n}: longest L within {args.budget_mib} MiB saved per rank: {max(fits) if fits else 'none'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm"), p.add_argument("--vision"), p.add_argument("--out")
    p.add_argument("--sizes", default="1,2,4", help="sequence-parallel sizes N (N ranks each)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="row widths, ascending")
    p.add_argument("--budget-mib", type=float, default=64.0)
    args = p.parse_args()
    if "RANK" in os.environ:
        run_rank(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
