"""`pretrain bench train`: our Trainer, and with `--peer` transformers' Trainer + DeepSpeed (pretrain.bench.peer), on
the same model, data and ZeRO stage, one after the other in one invocation.

Each runs as a torchrun job of `pretrain.bench.worker` with `nproc` processes. Figures are read back from the
metrics each writes per step (ours: the run's metrics.jsonl: tokens_per_s, samples_per_s, mfu, data_wait_frac,
step_time_s), over the steps after `warmup` (compilation, allocator and loader start-up): totals over the
measured time, and the median step beside them (one recompilation inside the window moves the totals, not it).
The peer's micro-batch holds as many samples as ours' packed micro-batches did on average, so both do the same work
per optimizer step.
MFU: model FLOPs of the real tokens (pretrain.model.flops, LM head at label positions) over the dense bf16 peak of
the devices; null on CPU. WORK_DIR/<run name>/result.json holds the result so far: ours' figures as soon as ours
ends (before the peer starts), then the whole; a peer that fails is reported in it (`peer_error`) beside ours.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil  # DeepSpeed's dependency; imported here, not in the signal handler that uses it

from pretrain.config import Config, save_config
from pretrain.model.flops import mfu
from pretrain.ports import free_port


def run_worker(role: str, config: Path, out: Path, nproc: int, timeout: int, extra: list[str] = ()) -> None:
    """One torchrun job of the bench worker; raises RuntimeError with the tail of its log if it fails.

    The job runs in its own process group, so a timeout stops torchrun and every rank. A supervisor that may have
    to stop this process the hard way learns that group from the file PRETRAIN_BENCH_PGIDS names (one process-group
    id appended per job: tools/gpu_bench.sh kills them on its way out); a SIGTERM here stops the job first."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "pretrain.bench.worker", role, str(config), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                                                         // nproc)))}
    log = out / f"{role}.log"
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench train: {role} on {nproc} process(es), log {log}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if os.environ.get("PRETRAIN_BENCH_PGIDS"):
            with open(os.environ["PRETRAIN_BENCH_PGIDS"], "a") as pgids:
                pgids.write(f"{proc.pid}\n")

        def stop(signum: int, _frame: Any) -> None:
            kill_job(proc.pid)
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(proc.pid)
            proc.wait()
            code = None
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code != 0 or not (out / "result.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        why = f"timed out after {timeout} s" if code is None else f"exit code {code}"
        raise RuntimeError(f"bench {role} failed ({why}); end of {log}:\n{tail}")


def kill_job(torchrun_pid: int) -> None:
    """SIGKILL a torchrun job: torchrun's process group and each rank's. torchrun starts every rank in a session of
    its own, so killing torchrun's group alone leaves the ranks running, orphaned (holding their GPU memory)."""
    try:
        ranks = [child.pid for child in psutil.Process(torchrun_pid).children()]
    except psutil.Error:  # torchrun is gone already
        ranks = []
    for pgid in (torchrun_pid, *ranks):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def summarize(records: list[dict], warmup: int, nproc: int, device: str) -> dict[str, Any]:
    """Throughput over the measured steps: totals over total time, not a mean of per-step rates; and beside them
    the medians of the per-step figures, which one slow step (a recompilation, a late loader worker) cannot move."""
    steps = [r for r in records if r["step"] > warmup] or records[-1:]
    time_s = sum(r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in steps)
    wait = sum(r["data_wait_frac"] * r["step_time_s"] for r in steps)
    out = {"steps": len(steps), "step_time_s": time_s / len(steps), "total_time_s": time_s,
           "tokens_per_s": tokens / time_s, "samples_per_s": samples / time_s, "samples_per_step": samples / len(steps),
           "data_wait_frac": wait / time_s, "mfu": None,
           "median": {"step_time_s": statistics.median(r["step_time_s"] for r in steps),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps), "mfu": None}}
    if all(r.get("flops") for r in steps):  # a device without a known peak (a CPU) gives None
        out["mfu"] = mfu(sum(r["flops"] for r in steps), time_s, nproc, device)
        if out["mfu"] is not None:
            out["median"]["mfu"] = statistics.median(mfu(r["flops"], r["step_time_s"], nproc, device) for r in steps)
    elif all(r.get("mfu") is not None for r in steps):  # ours: the trainer computes it per logged window
        out["mfu"] = sum(r["mfu"] * r["step_time_s"] for r in steps) / time_s
        out["median"]["mfu"] = statistics.median(r["mfu"] for r in steps)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _bench_config(cfg: Config, run_dir: Path, steps: int) -> Config:
    tree = cfg.model_dump(mode="json")
    tree["run"]["output_dir"] = str(run_dir)
    tree["train"].update(max_steps=steps, stop_at_step=None, log_every=1, val_every=0, progress_bar=False,
                         warmup_steps=min(cfg.train.warmup_steps, steps))
    tree["checkpoint"].update(every_steps=0, resume="none")
    return Config.model_validate(tree)


def bench_train(cfg: Config, work_dir: Path, steps: int, nproc: int | None = None, peer: bool = False,
                peer_batch: int | None = None, warmup: int | None = None, timeout: int = 3600) -> dict[str, Any]:
    import torch

    nproc = nproc or torch.cuda.device_count() or 1
    cfg.check_world_size(nproc)
    warmup = min(3, steps // 3) if warmup is None else warmup
    if steps <= warmup:
        raise RuntimeError(f"--steps ({steps}) must exceed the warm-up steps ({warmup})")
    root = work_dir / cfg.run.name
    ours_cfg = _bench_config(cfg, root / "ours", steps)
    for name in ("metrics.jsonl", "DONE"):
        (root / "ours" / name).unlink(missing_ok=True)
    (root / "result.json").unlink(missing_ok=True)
    save_config(ours_cfg, root / "ours.yaml")
    run_worker("ours", root / "ours.yaml", root / "ours", nproc, timeout)
    info = json.loads((root / "ours" / "result.json").read_text())
    result: dict[str, Any] = {"nproc": nproc, "steps": steps, "warmup_steps": warmup, "device": info["device"],
                              "ours": summarize(_read_jsonl(root / "ours" / "metrics.jsonl"), warmup, nproc,
                                                info["device"]) | {"gpu_mem_gib": info["gpu_mem_gib"]}}
    # Ours is on disk before the peer starts: a peer that fails or is stopped cannot take our figures with it.
    (root / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    if not peer:
        return result
    per_micro = result["ours"]["samples_per_step"] / (nproc * cfg.train.grad_accum)
    batch = peer_batch or max(1, round(per_micro))
    save_config(ours_cfg, root / "peer.yaml")
    try:
        run_worker("peer", root / "peer.yaml", root / "peer", nproc, timeout,
                   ["--batch", str(batch), "--steps", str(steps)])
    except RuntimeError as err:  # reported beside our figures, which stand
        result["peer_error"] = str(err)
        (root / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        return result
    pinfo = json.loads((root / "peer" / "result.json").read_text())
    result["peer"] = summarize(_read_jsonl(root / "peer" / "metrics.jsonl"), warmup, nproc, pinfo["device"]) | {
        "gpu_mem_gib": pinfo["gpu_mem_gib"], "micro_batch": batch}
    result["ratio"] = {k: result["ours"][k] / result["peer"][k] for k in ("tokens_per_s", "samples_per_s")}
    (root / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict[str, Any]) -> tuple[list[str], list[list], str]:
    header = ["trainer", "tokens/s", "samples/s", "MFU", "MFU (median)", "peak GPU GiB", "data wait", "step s",
              "step s (median)", "samples/step"]
    names = {"ours": "ours (packed, pretrain Trainer)", "peer": "peer (HF Trainer + DeepSpeed, padded)"}
    rows = []
    for key in ("ours", "peer"):
        if key in result:
            r = result[key]
            rows.append([names[key], r["tokens_per_s"], r["samples_per_s"], _percent(r["mfu"]),
                         _percent(r["median"]["mfu"]), r["gpu_mem_gib"], f"{100 * r['data_wait_frac']:.1f}%",
                         r["step_time_s"], r["median"]["step_time_s"], r["samples_per_step"]])
    notes = (f"{result['nproc']} process(es) on {result['device']}; {result['steps']} steps, the first "
             f"{result['warmup_steps']} left out. MFU and step s: totals over the measured steps; (median): the "
             "median step.")
    if "peer_error" in result:
        notes += " The peer did not finish: " + result["peer_error"].splitlines()[0]
    if "ratio" in result:
        notes += (f" ours / peer: {result['ratio']['tokens_per_s']:.2f}x tokens/s, "
                  f"{result['ratio']['samples_per_s']:.2f}x samples/s (peer micro-batch "
                  f"{result['peer']['micro_batch']} samples).")
    return header, rows, notes


def _percent(fraction: float | None) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"
