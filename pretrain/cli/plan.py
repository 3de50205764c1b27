"""`pretrain plan CONFIG --gpus N --gpu h100`: memory per GPU by ZeRO stage, step time, communication and the time to
train T tokens on 8 to 4,096 GPUs, from the FLOPs model. Analytic: runs anywhere, downloads nothing.

`--calibrate RUN_DIR [RUN_DIR ...]`: the hardware's FLOP rate, the cost of a collective call and a fixed cost per
step are fitted to the runs' measured step times (their metrics.jsonl and config.yaml), and the runtime's memory to
their peak memory; the plan then predicts CONFIG on the hardware those runs ran on."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.plan.planner import Plan

DEFAULT_MFU = 0.4
MFU_SOURCE = ("assumed, not measured: a round figure under the 46.2% MFU PaLM reports for its own training "
              "(Chowdhery et al., 2022), since a VLM step adds short sequences and a small tower; measure with "
              "--calibrate RUN_DIR or pass --mfu")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="estimate memory, step time and cost of a recipe on a GPU cluster",
                              description=__doc__)
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    p.add_argument("--gpus", type=int, help="cluster size for the per-stage memory table (default 8; with "
                   "--calibrate: the world size the recipe's global batch implies, else the runs')")
    p.add_argument("--gpu", default="h100", help="a100-40gb, a100-80gb, h100, h200, l40s, mi300x, b200 (the table "
                   "in pretrain/plan/estimate.py; an unknown name lists it)")
    p.add_argument("--tokens", type=float, default=1e9, help="decoder tokens to train (default 1e9)")
    p.add_argument("--mfu", type=float, help=f"utilisation of the peak on the hardware's FLOPs (default {DEFAULT_MFU}, "
                   "an assumption: pass a measured value, or --calibrate)")
    p.add_argument("--calibrate", nargs="+", metavar="RUN_DIR",
                   help="fit the hardware coefficients to these runs' measured steps and predict on their hardware")
    p.add_argument("--step-quantile", type=float, default=0.5,
                   help="the quantile of each run's step times that is fitted (default 0.5, the median; lower on a "
                   "shared machine, where contention only lengthens steps)")
    p.add_argument("--length-samples", type=int, default=512,
                   help="samples read from the shards for the length distribution (0: assume uniform samples)")
    p.add_argument("--zero", type=int, choices=range(4), help="ZeRO stage for the scaling table (default: recipe)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default data.max_length)")
    p.add_argument("--sample-len", type=int, help="decoder tokens per sample, image tokens included")
    p.add_argument("--text-tokens", type=int, help="text tokens per sample (default 64 align, 256 otherwise)")
    p.add_argument("--images-per-sample", type=int, default=1)
    p.add_argument("--clips-per-sample", type=int,
                   help="video clips per sample, each data.video_frames frames (default: 1 when data.video_frames>0)")
    p.add_argument("--logit-tokens", type=int, help="positions per sample where the LM head runs (default: text)")
    p.add_argument("--micro-batch", type=int, help="rows per GPU per micro-step (default train.micro_batch_size)")
    p.add_argument("--no-chunked-ce", action="store_true", help="materialise fp32 logits for every label position")
    p.add_argument("--net-gbps", type=float, default=400.0, help="inter-node Gbit/s per GPU (default 400)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpu-adam-rate", type=float, default=1e9, help="host Adam parameters/s per GPU (offload)")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="CUDA context, NCCL, fragmentation per GPU")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pretrain.config import ConfigError, load_config
    from pretrain.plan.estimate import GPUS, Cluster
    from pretrain.plan.planner import SCALE, calibrated_plan, data_samples, make_plan

    # A ConfigError (bad key, unresolvable model, unknown GPU, a run directory without metrics) is reported by
    # pretrain.cli.main, exit 2.
    cfg = load_config(args.config, args.overrides)
    if args.gpu not in GPUS:
        raise ConfigError(f"--gpu {args.gpu}: unknown GPU (valid: {', '.join(sorted(GPUS))})")
    work_kw = dict(seq_len=args.seq_len, sample_len=args.sample_len, text_tokens=args.text_tokens,
                   images_per_sample=args.images_per_sample, logit_tokens=args.logit_tokens,
                   clips_per_sample=args.clips_per_sample, micro_batch=args.micro_batch,
                   chunked_ce=not args.no_chunked_ce)
    if args.calibrate:
        if args.mfu is not None:
            raise ConfigError("--mfu and --calibrate exclude each other: calibration measures the FLOP rate")
        plan = calibrated_plan(cfg, args.calibrate, args.gpu, args.gpus, args.tokens, args.length_samples, SCALE,
                               args.step_quantile, **work_kw)
    else:
        mfu = DEFAULT_MFU if args.mfu is None else args.mfu
        cluster = Cluster(GPUS[args.gpu], mfu=mfu, mfu_source=MFU_SOURCE if args.mfu is None else "given (--mfu)",
                          net_Bps=args.net_gbps * 1e9 / 8, gpus_per_node=args.gpus_per_node,
                          cpu_adam_params_per_s=args.cpu_adam_rate, overhead_gib=args.overhead_gib)
        samples, lengths = data_samples(cfg, args.length_samples)
        plan = make_plan(cfg, args.gpus or 8, args.gpu, args.tokens, mfu, args.zero, SCALE, cluster,
                         lengths=lengths, samples=samples, **work_kw)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else render(plan, args.config))
    return 0


def render(plan: Plan, source: str = "") -> str:
    """The plan as a readable report: model, work, memory by ZeRO stage, then the scaling table."""
    from pretrain.plan.estimate import GIB

    w, p, f, g = plan.work, plan.params, plan.sample_flops, plan.gpu
    lines = [
        f"pretrain plan: {source} on {plan.n_gpus} x {g.name} ({g.memory_bytes / GIB:.1f} GiB, "
        f"{g.peak_flops / 1e12:.0f} TFLOP/s dense bf16)",
        f"model    llm {_n(p.llm)} + vision {_n(p.vision)} + projector {_n(p.projector)} = {_n(p.total)} params; "
        f"stage {w.stage} trains {_n(w.trained_params(p))}"
        + (f" (LoRA: {_n(w.lora.adapters)} adapter params, {_n(w.lora.frozen_base)} base frozen)"
           if w.lora.adapters else ""),
        f"work     rows of {w.row_tokens} tokens ({'packed, ' if w.packing else ''}{w.samples_per_row:.3g} x "
        f"{w.sample_len}-token samples, {w.image_positions} image tokens and "
        f"{w.logit_tokens} logit positions each); {w.micro_batch} rows/GPU/micro-step; {w.precision}; "
        f"checkpointing {w.checkpointing}",
        f"FLOPs    per sample {f.total / 1e12:.3g} TFLOP (forward {f.forward / 1e12:.3g}, backward "
        f"{f.backward / 1e12:.3g}): " + ", ".join(
            f"{name} {getattr(f, name).total / f.total:.1%}" for name in
            ("decoder", "attention", "lm_head", "vision", "vision_attention", "projector")),
        f"rate     {plan.cluster.rate / 1e12:.3g} TFLOP/s on the hardware's FLOPs (padding and recompute included): "
        f"MFU {plan.cluster.mfu:.3g} x peak, {plan.cluster.mfu_source}",
        f"data     lengths {plan.lengths}: {w.batch().padding_waste:.1%} of the decoder's positions are padding, "
        f"{w.batch().text_only_fraction:.1%} of the samples have no image",
        f"assume   "
        f"links {g.nvlink_Bps / 1e9:.0f} GB/s within {plan.cluster.gpus_per_node} GPUs, "
        f"{plan.cluster.net_Bps / 1e9:.0f} GB/s per GPU beyond; host Adam {plan.cluster.cpu_adam_params_per_s:.2g} "
        f"params/s/GPU; {plan.cluster.overhead_gib:g} GiB runtime overhead",
        "",
        f"memory per GPU at {plan.n_gpus} GPUs (GiB; host = offloaded, per GPU)",
        _row(("zero", "params", "grads", "optim", "activ", "buffers", "other", "total", "host", "fits")),
    ]
    for stage, m in plan.by_stage.items():
        gib = m.as_gib()
        lines.append(_row((stage, *(f"{gib[k]:.1f}" for k in ("params", "grads", "optimizer", "activations",
                                                               "buffers", "overhead", "total", "host")),
                           "yes" if m.total <= g.memory_bytes else "NO")))
    ds = plan.ds
    offload = ", ".join(f"offload {k} {v}" for k, v in (("optimizer", ds.offload_optimizer),
                                                        ("params", ds.offload_params)) if v != "none")
    lines += ["", f"scaling at ZeRO-{ds.zero_stage}{' (' + offload + ')' if offload else ''}: time for "
              f"{plan.tokens:.3g} tokens",
              _row(("gpus", "micro", "accum", "rows/step", "step s", "tok/s/GPU", "MFU", "comm GB", "need GB/s",
                    "link GB/s", "exposed s", "mem GiB", "fits", "hours"))]
    marks: list[str] = []
    for n, e in plan.scaling:
        if e is None:
            lines.append(_row((n, "-", f"train.global_batch_size={w.global_batch} does not split over {n} GPUs")))
            continue
        changed = (e.micro_batch, e.grad_accum) != (w.micro_batch, w.grad_accum)
        marks += [f"{n} GPUs: train.micro_batch_size={e.micro_batch} train.grad_accum={e.grad_accum}"] * changed
        lines.append(_row((n, f"{e.micro_batch}*" if changed else e.micro_batch, e.grad_accum, e.global_rows,
                           f"{e.step_s:.3g}",
                           f"{e.tokens_per_s_per_gpu:,.0f}",
                           f"{e.effective_mfu(g.peak_flops):.2f}", f"{e.comm_bytes / 1e9:.3g}",
                           f"{e.need_Bps / 1e9:.3g}", f"{e.link_Bps / 1e9:.0f}", f"{e.exposed_comm_s:.2g}",
                           f"{e.memory.total / GIB:.1f}", "yes" if e.memory.total <= g.memory_bytes else "NO",
                           f"{e.hours_for(plan.tokens):.3g}")))
    if plan.calibrated is not None:
        lines += ["", *_calibrated_lines(plan.calibrated)]
    if marks:
        lines += ["", "* the recipe's batch does not run at that size as written; `pretrain train` and `pretrain "
                  "submit` stop there and name this fix: " + "; ".join(marks)]
    return "\n".join(lines)


def _row(cells: tuple) -> str:
    return "  ".join(f"{c!s:>9}" for c in cells).rstrip()


def _n(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(int(count))


def _calibrated_lines(c: dict) -> list[str]:
    k = c["coefficients"]
    lines = [f"calibrated at {c['world_size']} rank(s) on the runs' hardware: step {c['step_time_s']:.4g} s, "
             f"{c['tokens_per_s']:,.0f} tokens/s"
             + (f", peak memory {c['peak_memory_gib']:.3g} GiB" if "peak_memory_gib" in c else ""),
             f"fitted   {k['flops_per_s'] / 1e12:.4g} TFLOP/s, {k['call_s'] * 1e6:.4g} us per collective call, "
             f"{k['fixed_step_s'] * 1e3:.4g} ms per step (fitted: {', '.join(k['fitted'])}; rms {k['rms_s']:.3g} s)"
             + ("" if k["memory_overhead_gib"] is None else f"; runtime memory {k['memory_overhead_gib']:.3g} GiB"),
             _row(("run", "ranks", f"q{c['step_quantile']:g} s", "fitted s", "error"))]
    for r in c["runs"]:
        lines.append(_row((r["run_dir"], r["world_size"], f"{r['measured_step_s']:.4g}", f"{r['fitted_step_s']:.4g}",
                           f"{r['fitted_step_s'] / r['measured_step_s'] - 1:+.1%}")))
    return lines
