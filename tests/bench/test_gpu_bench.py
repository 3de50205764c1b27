"""The one device call (tools/gpu_bench.sh) rehearsed end to end in its CPU mode, so a typo cannot cost device minutes;
its time boxes and its trap; the wheel set it installs, closure-checked against the device image offline; and the
pieces of its correctness stage that can be held here (pretrain.bench.device_check, pretrain.bench.device_env)."""

from __future__ import annotations

import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers.runs import write_config

from pretrain import distributed
from pretrain.bench import device_env
from pretrain.bench.device_check import COLLECTIVES, recompile_log

ROOT = Path(__file__).resolve().parents[2]


def _gpu_bench(tmp_path: Path, timeout: int, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, work = tmp_path / "out", tmp_path / "work"
    run_env = {**os.environ, "GPU_BENCH_MODE": "cpu", "OUT": str(out), "WORK": str(work), "PY": sys.executable,
               "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_bench.sh")], cwd=ROOT, env=run_env, text=True,
                          capture_output=True, timeout=timeout)
    return done, out, work


def _stages(work: Path) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in (line.split("\t") for line in (work / "stages.tsv").read_text().splitlines())}


def _all_gone(work: Path) -> list[int]:
    """The processes (not zombies) still alive in the process groups the call recorded, or anywhere else with the
    call's work folder on their command line (torchrun starts each rank in a session of its own)."""
    groups = {int(p) for p in (work / "pgids").read_text().split()}
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if (int(fields[2]) in groups or str(work) in cmdline) and fields[0] != "Z":  # state, ppid, pgrp
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow
def test_gpu_bench_rehearsal_runs_every_stage_and_returns_the_table(tmp_path, assets, shapes):
    """The whole call on tiny recipes: install checked, every correctness check passes on gloo/fp32, ours and the
    peer timed for both recipes, and what comes back is three files: the summary, the JSON, the logs."""
    config = write_config(tmp_path / "config.yaml", assets, shapes, **{"run.name": "tiny"})
    done, out, work = _gpu_bench(tmp_path, 900, GPU_BENCH_MID=str(config), GPU_BENCH_SMALL=str(config), STEPS="3",
                                 WARMUP="1", GPU_BENCH_OVERRIDES="data.num_workers=0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    stages = _stages(work)
    assert list(stages) == ["install", "correctness", "shards", "mid", "small", "qlora"]
    assert all(s[0] == "ok" for s in stages.values()), stages
    results = json.loads((out / "results.json").read_text())
    assert results["qlora"]["ok"], results["qlora"]  # CPU mode: the same LoRA path, unquantized
    assert results["install"]["ok"] and results["install"]["deepspeed_accelerator"] == "cpu"
    checks = results["correctness"]["checks"]
    assert {k for k, c in checks.items() if c["ok"]} == {
        "attention_sdpa", "attention_eager", "attention_flex_attention", "recompiles", "collectives", "checkpoint",
        "matmul"}
    assert results["correctness"]["skipped_implementations"] == {"flash_attention_2": "flash-attn needs CUDA"}
    for recipe in ("mid", "small"):
        train = results["train"][recipe]
        ours, peer = train["ours"], train["peer"]
        assert ours["mfu"] is None and ours["gpu_mem_gib"] is None  # CPU: no peak to divide by, no GPU memory
        assert peer["micro_batch"] == 4 and ours["samples_per_step"] == peer["samples_per_step"] == 4
        # The figures, recomputed from each trainer's own metrics.jsonl (time-weighted, warm-up steps left out).
        for who in ("ours", "peer"):
            rows = _measured(work / "bench" / recipe / "tiny" / who / "metrics.jsonl", train["warmup_steps"])
            assert train[who]["tokens_per_s"] == pytest.approx(
                sum(r["tokens_per_s"] * r["step_time_s"] for r in rows) / sum(r["step_time_s"] for r in rows))
            median = statistics.median(r["step_time_s"] for r in rows)
            assert train[who]["median"]["step_time_s"] == pytest.approx(median)
        assert train["ratio"]["tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
        assert not (work / "bench" / recipe / "tiny" / "ours" / "checkpoints").exists()
    summary = (out / "summary.md").read_text()
    assert "| mid | ours |" in summary and "| small | peer |" in summary and "| checkpoint | yes |" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("mid/tiny/ours/metrics.jsonl") for n in names)
    assert any(n.endswith("logs/correctness.log") for n in names) and any(n.endswith("ours.yaml") for n in names)
    assert _all_gone(work) == []


def _measured(path: Path, warmup: int) -> list[dict]:
    rows = [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines())) if r["step"] > warmup]
    assert rows, path
    return rows


@pytest.mark.slow
def test_gpu_bench_stops_a_stage_at_its_box_skips_what_cannot_fit_and_still_writes_the_summary(tmp_path, assets,
                                                                                            shapes):
    """A stage over its box is stopped with every process group it started (the torchrun job pretrain bench
    starts in its own session included); a stage without the time left is skipped and said; the summary stands."""
    config = write_config(tmp_path / "config.yaml", assets, shapes, **{"run.name": "tiny"})
    done, out, work = _gpu_bench(tmp_path, 300, STAGES="mid small", GPU_BENCH_BOXES="mid=18", BUDGET_S="48",
                                 GPU_BENCH_MID=str(config), GPU_BENCH_SMALL=str(config), STEPS="400",
                                 GPU_BENCH_OVERRIDES="data.num_workers=0")
    assert done.returncode == 0, done.stdout + done.stderr
    stages = _stages(work)
    assert stages["mid"][0] == "FAILED" and "stopped at its box of 18 s" in stages["mid"][2], stages
    assert stages["small"][0] == "skipped", stages
    assert len(set((work / "pgids").read_text().split())) == 2  # the stage's group and the torchrun job's, both gone
    assert _all_gone(work) == []
    summary = (out / "summary.md").read_text()
    assert "stopped at its box" in summary and "timing: no recipe finished" in summary
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]


def test_carried_wheels_and_the_image_meet_every_requirement_at_our_pins():
    """Offline: each carried wheel is what constraints.txt pins (its requirements read from this environment's
    metadata), and the project's and the wheels' requirements are all met by the wheels or the image's list."""
    pins = {device_env.canonical(n): v for n, v in device_env.read_list(ROOT / "constraints.txt").items()}
    listed = device_env.read_list(device_env.WHEEL_LIST)
    assert {n: v for n, v in listed.items() if n in pins} == {n: pins[n] for n in listed if n in pins}
    carried = device_env.venv_carried(listed)
    image = device_env.read_list(device_env.IMAGE_LIST)
    own = device_env.project_requirements()
    assert device_env.closure_problems(own, carried, image) == []
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0"
    # The check can fail: without typing-extensions (the image's is older than pydantic needs), with a pin the
    # image holds at an unread version (pillow), or at another version (numpy), or with a package nobody has.
    for name in ("typing-extensions", "pillow", "numpy"):
        problems = device_env.closure_problems(own, {k: v for k, v in carried.items() if k != name}, image)
        assert any(p.startswith(name) for p in problems), (name, problems)
    assert device_env.closure_problems(["no-such-package==1.0"], {}, image) == [
        "no-such-package==1.0 (required by the project) is neither carried nor in the image"]


def test_the_collectives_check_covers_every_collective_of_the_communication_layer():
    """Every function of pretrain.distributed that communicates is run by the device check's `collectives` (and
    `finish`, the exit path, by every process of it)."""
    communicating = {name for name, fn in inspect.getmembers(distributed, inspect.isfunction)
                     if fn.__module__ == distributed.__name__
                     and re.search(r"tdist\.(all_reduce|all_gather|broadcast|barrier)|_GatherWithGrad\.apply|store\.",
                                   inspect.getsource(fn))}
    assert communicating == {*COLLECTIVES, "finish"}


def test_the_recompile_log_sees_a_recompile():
    """What the `recompiles` check counts: dynamo's recompile messages (a shape change recompiles a static
    compile), none for a call at a shape already compiled."""
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with recompile_log() as messages:
        double(torch.ones(3))
        double(torch.ones(3))
        assert messages == []
        double(torch.ones(5))
    assert len(messages) == 1 and messages[0].startswith("Recompiling function")
