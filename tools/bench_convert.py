"""Memory and speed of `pretrain convert` on a synthetic ZeRO-3 checkpoint, next to DeepSpeed's zero_to_fp32.

`make` writes a committed ZeRO-3 checkpoint without training. The real trainer builder and DeepSpeed's own
save_checkpoint make a tiny template run on N CPU ranks; the big checkpoint (TinyLlama's shape for `1b`: a 1.1B
Llama decoder + a tiny CLIP tower) is those files with the big model's layout and weights put in (see `generate`,
checked against DeepSpeed's structure by `self_check`). No optimizer step is taken, so the optimizer shards hold
the fp32 master weights but no Adam moments, which neither converter reads. `measure` runs each converter under
`/usr/bin/time -v` (peak RSS, wall time), then checks that our fp32 export equals DeepSpeed's consolidation tensor by
tensor.

    .venv/bin/python tools/bench_convert.py all WORK_DIR [--size 1b|250m|tiny] [--nproc 2] [--converters ...]
        [--record benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"  # GNU time (Debian package `time`), for the peak RSS of a whole process
SIZES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "250m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}
TAG = "step_00000000"


# -- make -----------------------------------------------------------------------------------------------------------
# A 1B model cannot go through a real DeepSpeed engine on this machine: fp32 ZeRO-3 holds about 4.6x the model's fp32
# size across ranks while building and saving (measured: 5.6 GB for 250M parameters). So the real engine saves a
# tiny model of the same family (the template), and the big checkpoint is the template's files with the big model's
# layout and weights put in: param shapes and flat-group order as DeepSpeed derives them from the trainer's param
# groups, every other key as DeepSpeed wrote it. The generator is checked by regenerating the template's own model
# and comparing the structure with what DeepSpeed wrote (`self_check`).
def run_config(run: Path, tok_dir: Path, size: str):
    from pretrain.config import Config

    llm = {"model_type": "llama", "max_position_embeddings": 2048, "tie_word_embeddings": False, **SIZES[size]}
    vision = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    return Config(run={"output_dir": str(run)}, model={"llm": llm, "vision": vision, "tokenizer": str(tok_dir)},
                  data={"train": [{"urls": "unused"}]}, train={"max_steps": 1, "stage": "full", "precision": "fp32"},
                  deepspeed={"zero_stage": 3})


def make_template(work: Path, nproc: int) -> Path:
    from pretrain.demo import tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer
    from pretrain.ports import free_port

    build_tokenizer(tokenizer_corpus(), vocab_size=400).save_pretrained(work / "tokenizer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), __file__, "_rank", str(work / "template"), str(work / "tokenizer")]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return work / "template" / "checkpoints" / TAG


def _rank_main(run: Path, tok_dir: Path) -> None:
    """One rank of the template run: the trainer's builder and DeepSpeed's save, as Trainer.save does it."""
    from pretrain import distributed
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.ds_config import build_ds_config
    from pretrain.train.engine import build_engine

    cfg = run_config(run, tok_dir, "tiny")
    rank, world, _ = distributed.init(30)
    built = build_engine(cfg, build_ds_config(cfg, world))
    root = run / "checkpoints"
    built.engine.save_checkpoint(str(root), tag=TAG, client_state={"step": 0}, save_latest=False)
    if rank == 0:
        meta = root / TAG / ckpt.HF_META
        built.engine.module.vlm.config.save_pretrained(meta)
        built.tokenizer.save_pretrained(meta)
        built.image_processor.save_pretrained(meta)
    distributed.barrier()
    if rank == 0:
        ckpt.commit(root, TAG, {"step": 0, "world_size": world, "zero_stage": 3})
    distributed.finish(0)


def zero3_layout(cfg, world: int, sub_group_size: float = 1e9) -> tuple[list[dict], list[str], object]:
    """DeepSpeed's flat groups for the trainer's param groups: [{name: shape}] per (sub-)group, in flat order; the
    module's parameter names in state-dict order; the Llava config. Sub-groups are cut as DeepSpeed's
    stage3._create_fp16_sub_groups cuts them (by partition numel)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info
    from transformers import LlavaForConditionalGeneration

    from pretrain.model.build import build_llava_config, load_tokenizer
    from pretrain.model.stages import apply_stage, param_groups

    llava_cfg = build_llava_config(cfg.model, load_tokenizer(cfg.model))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_cfg)
    apply_stage(model, cfg.train.stage)
    names = {id(p): "vlm." + n for n, p in model.named_parameters()}
    flat = []
    for group in param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.lr_multipliers):
        sub, size = {}, 0
        for i, p in enumerate(group["params"]):
            sub[names[id(p)]] = p.shape
            size += zero3_partitioned_param_info(p.numel(), world)[0]
            if size >= sub_group_size or i == len(group["params"]) - 1:
                flat.append(sub)
                sub, size = {}, 0
    return flat, list(names.values()), llava_cfg


def full_tensor(index: int, shape, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=g) * 0.02


def generate(template: Path, run: Path, cfg, world: int) -> Path:
    """The big checkpoint from the template's files, rank by rank (one rank's partitions in memory at a time)."""
    from collections import OrderedDict

    import torch
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_SHAPES
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    from pretrain.train import checkpoint as ckpt

    groups, module_names, llava_cfg = zero3_layout(cfg, world)
    tag_dir = run / "checkpoints" / TAG
    tag_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        model = torch.load(template / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=False)
        model["module"] = OrderedDict((n, torch.empty(0)) for n in module_names)  # ZeRO-3 placeholders
        model[PARAM_SHAPES] = [OrderedDict((n, torch.Size(s)) for n, s in g.items()) for g in groups]
        torch.save(model, tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        optim = torch.load(template / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
        flats, index = [], 0
        for g in groups:
            parts = []
            for shape in g.values():
                full = full_tensor(index, shape).reshape(-1)
                part = zero3_partitioned_param_info(full.numel(), world)[0]
                piece = full[r * part : (r + 1) * part]
                parts.append(torch.cat([piece, piece.new_zeros(part - piece.numel())]))  # the last rank's padding
                index += 1
            flats.append(torch.cat(parts))
            del parts
        optim[OPTIMIZER_STATE_DICT][FP32_FLAT_GROUPS] = flats
        torch.save(optim, tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        del flats, optim
    meta = tag_dir / ckpt.HF_META
    llava_cfg.save_pretrained(meta)
    for f in (template / ckpt.HF_META).iterdir():
        if f.name != "config.json":
            (meta / f.name).write_bytes(f.read_bytes())
    ckpt.commit(tag_dir.parent, TAG, {"step": 0, "world_size": world, "zero_stage": 3})
    return run


def self_check(template: Path, work: Path, world: int) -> None:
    """Regenerate the template's own model: the structure must be exactly what DeepSpeed wrote."""
    import torch

    cfg = run_config(work / "check", work / "tokenizer", "tiny")
    generate(template, work / "check", cfg, world)
    got = work / "check" / "checkpoints" / TAG
    for r in range(world):
        for kind in ("model", "optim"):
            name = f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
            a = torch.load(template / name, weights_only=False)
            b = torch.load(got / name, weights_only=False)
            if _structure(a) != _structure(b):
                raise AssertionError(f"generated {name} differs in structure from DeepSpeed's")


def _structure(obj):
    """Keys, types and tensor shapes/dtypes, recursively (values ignored)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return (type(obj).__name__, tuple((k, _structure(v)) for k, v in obj.items()))
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, tuple(_structure(v) for v in obj))
    return type(obj).__name__


def make(work: Path, size: str, nproc: int) -> Path:
    template = make_template(work, nproc)
    self_check(template, work, nproc)
    print(f"generator checked against DeepSpeed's own save of the same model ({template})", flush=True)
    t0 = time.time()
    run = generate(template, work / "run", run_config(work / "run", work / "tokenizer", size), nproc)
    print(f"made {run} in {time.time() - t0:.0f} s", flush=True)
    return run


# -- measure -----------------------------------------------------------------------------------------------------------
def timed(cmd: list[str], log: Path) -> dict:
    """Run under GNU time -v; its peak RSS (KiB) and wall seconds."""
    out = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed, see {log}:\n{out.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", out.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return {"cmd": " ".join(cmd), "peak_rss_bytes": rss * 1024, "wall_s": seconds}


def model_numbers(run: Path) -> tuple[int, int]:
    """(parameters, fp32 bytes) of the checkpointed model, from DeepSpeed's param shapes (no weights loaded)."""
    from pretrain.export.zero import ZeroCheckpoint

    zero = ZeroCheckpoint(run / "checkpoints" / TAG)
    n = sum(loc.numel for loc in zero.locs.values())
    return n, 4 * n


CONVERTERS = ("ours_bf16", "ours_fp32", "deepspeed_zero_to_fp32")


def measure(run: Path, work: Path, converters: list[str]) -> dict:
    tag_dir = run / "checkpoints" / TAG
    py = sys.executable
    cmds = {
        "ours_bf16": [py, "-m", "pretrain", "convert", str(run), str(work / "hf_bf16"), "--dtype", "bf16"],
        "ours_fp32": [py, "-m", "pretrain", "convert", str(run), str(work / "hf_fp32"), "--dtype", "fp32"],
        "deepspeed_zero_to_fp32": [py, "-m", "deepspeed.utils.zero_to_fp32", str(tag_dir.parent),
                                   str(work / "ds_fp32"), "-t", TAG, "--safe_serialization"],
    }
    results = {name: timed(cmds[name], work / f"{name}.log") for name in converters}
    if "ours_fp32" in results:
        results["identical_to_deepspeed"] = compare(work / "hf_fp32", tag_dir)
    return results


def compare(ours: Path, tag_dir: Path) -> bool:
    """Our export vs DeepSpeed's own consolidation (lazy mode: one tensor at a time), tensor by tensor."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors import safe_open
    from transformers import LlavaConfig

    from pretrain.export.layout import export_layout
    from pretrain.export.sources import weight_files

    layout = export_layout(LlavaConfig.from_pretrained(tag_dir / "hf_meta"))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
    files = weight_files(ours)
    if len(files) != len(layout.tensors):
        return False
    for t in layout.tensors:
        with safe_open(files[t.disk_name], "pt") as f:
            if not torch.equal(f.get_tensor(t.disk_name), reference["vlm." + t.name].contiguous()):
                return False
    return True


def report(results: dict, n_params: int, fp32_bytes: int, size: str, nproc: int) -> str:
    gb = 1e9
    lines = [f"Synthetic ZeRO-3 checkpoint ({size}): {n_params / 1e9:.3f} B parameters, fp32 weights "
             f"{fp32_bytes / gb:.2f} GB, {nproc} ranks.", "",
             "| converter | peak RSS | % of fp32 model | wall | fp32 GB / wall s |", "| --- | --- | --- | --- | --- |"]
    for name in [c for c in CONVERTERS if c in results]:
        r = results[name]
        lines.append(f"| {name} | {r['peak_rss_bytes'] / gb:.2f} GB | {100 * r['peak_rss_bytes'] / fp32_bytes:.0f}% "
                     f"| {r['wall_s']:.1f} s | {fp32_bytes / gb / r['wall_s']:.2f} |")
    if "identical_to_deepspeed" in results:
        lines += ["", f"Our fp32 export equals DeepSpeed's consolidation tensor by tensor: "
                      f"{'identical' if results['identical_to_deepspeed'] else 'DIFFERENT'}."]
    lines += ["", "Peak RSS and wall time of the whole process, Python start-up and imports included; the speed "
                  "column is the model's fp32 size over that wall time.", "",
              "Commands (each under `/usr/bin/time -v`):"]
    lines += [f"- `{results[k]['cmd']}`" for k in CONVERTERS if k in results]
    return "\n".join(lines)


def environment() -> str:
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "pretrain", "tools"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "deepspeed", "transformers", "safetensors"))
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, no GPU; "
            f"Python {platform.python_version()}, {versions}; commit {commit.stdout.strip() or 'unknown'}"
            f"{' + uncommitted changes' if dirty else ''}")


RESULTS_HEADER = """# Benchmark results

Each entry: date, machine, versions, commit, and the exact commands. Numbers from a shared machine (other jobs
running) are marked as such; compare entries only on the same machine.
"""


def record(path: Path, size: str, text: str) -> None:
    cmd = " ".join([".venv/bin/python", "tools/bench_convert.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    body = (f"\n## Checkpoint conversion: peak memory and speed ({size})\n\n{environment()}; load average "
            f"{load:.1f} during the run (shared machine).\n\nDriver: `{cmd}`\n\n{text}\n")
    existing = path.read_text() if path.exists() else RESULTS_HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(existing + body)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        _rank_main(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("make", "measure", "all"))
    p.add_argument("work", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--converters", default=",".join(CONVERTERS), help="a comma-separated subset of the default")
    p.add_argument("--record", type=Path, default=None, help="append the results to this markdown file")
    args = p.parse_args()
    if not Path(TIME).exists():
        sys.exit(f"{TIME} is missing: apt-get install time")
    args.work.mkdir(parents=True, exist_ok=True)
    run = make(args.work, args.size, args.nproc) if args.step in ("make", "all") else args.work / "run"
    if args.step == "make":
        return 0
    n_params, fp32_bytes = model_numbers(run)
    results = measure(run, args.work, args.converters.split(","))
    text = report(results, n_params, fp32_bytes, args.size, args.nproc)
    (args.work / "results.json").write_text(json.dumps({"n_params": n_params, **results}, indent=1))
    print(text)
    if args.record:
        record(args.record, args.size, text)
    return 0 if results.get("identical_to_deepspeed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
