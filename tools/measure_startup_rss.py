"""Start-up host memory of one training process on CPU: RSS after the model build and peak RSS after
deepspeed.initialize, for a ~1B config-built Llama (random weights) + a small CLIP tower, built in fp32 (what the
trainer did before) or in the training precision, bf16 (what pretrain.train.engine.host_dtype does now).

    .venv/bin/python tools/measure_startup_rss.py [--hidden 2048 --layers 16 --stage 2]

Each case runs in a fresh process (world size 1, gloo) through pretrain.train.engine.build_engine; the table is
printed last. The fp32 case replaces host_dtype for that process only.
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


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _config(args: argparse.Namespace, tokenizer_dir: str):
    from pretrain.config import build_config

    llm = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
           "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 128,
           "num_key_value_heads": args.hidden // 128, "vocab_size": 32000, "max_position_embeddings": 2048,
           "tie_word_embeddings": False}
    vision = {"model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024,
              "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 224, "patch_size": 14}
    return build_config({
        "run": {"output_dir": tempfile.mkdtemp()},
        "model": {"llm": llm, "vision": vision, "tokenizer": tokenizer_dir, "attn_implementation": "sdpa"},
        "data": {"train": [{"urls": "unused.tar"}], "num_workers": 0},
        "train": {"precision": "bf16", "max_steps": 1, "micro_batch_size": 1, "progress_bar": False},
        "deepspeed": {"zero_stage": args.stage},
    })


def child(args: argparse.Namespace) -> None:
    import torch

    from pretrain import distributed
    from pretrain.model.tiny import build_tokenizer
    from pretrain.train import engine as setup
    from pretrain.train.ds_config import build_ds_config

    tok_dir = tempfile.mkdtemp()
    build_tokenizer(["a tokenizer for a memory measurement"], vocab_size=300).save_pretrained(tok_dir)
    cfg = _config(args, tok_dir)
    if args.build == "fp32":
        setup.host_dtype = lambda cfg: torch.float32
    built_rss = {}
    inner = setup.build_model

    def build_model(*a, **kw):
        model = inner(*a, **kw)
        built_rss.update(rss=_rss_gib(), params=sum(p.numel() for p in model.parameters()),
                         dtype=str(next(model.parameters()).dtype))
        return model

    setup.build_model = build_model
    rss_start = _rss_gib()
    distributed.init(30)
    engine = setup.build_engine(cfg, build_ds_config(cfg, 1)).engine
    print("RESULT " + json.dumps({
        "build": args.build, "stage": args.stage, "params": built_rss["params"], "built_dtype": built_rss["dtype"],
        "rss_at_start_gib": rss_start, "rss_after_build_gib": built_rss["rss"], "rss_after_engine_gib": _rss_gib(),
        "peak_rss_gib": _peak_gib(), "engine_dtype": str(next(engine.module.parameters()).dtype)}), flush=True)
    distributed.finish(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--build", choices=["fp32", "bf16"], help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.build:
        return child(args)
    rows = []
    for build in ("fp32", "bf16"):
        cmd = [sys.executable, __file__, "--hidden", str(args.hidden), "--layers", str(args.layers), "--stage",
               str(args.stage), "--build", build]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{build} case failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
    print("| host build | params | ZeRO | RSS after build (GiB) | RSS after engine (GiB) | peak RSS (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['built_dtype']} | {r['params'] / 1e9:.2f} B | {r['stage']} | {r['rss_after_build_gib']:.2f} | "
              f"{r['rss_after_engine_gib']:.2f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
