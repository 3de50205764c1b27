"""The table tools/gpu_bench.sh leaves in $OUT/summary.md, and $OUT/results.json (every stage's JSON), from what
its stages wrote under WORK: stages.tsv, install.json, correctness.json, bench/<recipe>/<run>/result.json (pretrain
bench train's), any other <stage>.json. Standard library only, and every part optional: it runs whatever happened
before it.

    python tools/gpu_bench_summary.py WORK OUT
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM and H200
RECIPES = ("mid", "small")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json_line(path: Path) -> dict[str, Any] | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def stages_table(work: Path) -> list[str]:
    rows = ["| stage | status | seconds | note |", "|---|---|---|---|"]
    try:
        for line in (work / "stages.tsv").read_text().splitlines():
            rows.append("| " + " | ".join(line.split("\t")) + " |")
    except OSError:
        rows.append("| (no stage ran) | | | |")
    return rows


def install_lines(install: dict[str, Any] | None) -> list[str]:
    if install is None:
        return ["install: no result (see logs/install.log)"]
    versions = ", ".join(f"{k} {v}" for k, v in install.get("versions", {}).items())
    out = [f"- device: {install.get('device')}; DeepSpeed accelerator: {install.get('deepspeed_accelerator')}; "
           f"NCCL: {install.get('nccl') or install.get('backends')}",
           f"- versions: {versions}"]
    for key in ("wrong_versions", "closure_problems"):
        if install.get(key):
            out.append(f"- {key.replace('_', ' ')}: {install[key]}")
    return out


def correctness_lines(checks: dict[str, Any] | None) -> list[str]:
    if checks is None:
        return ["correctness: no result (see logs/correctness.log)"]
    rows = [f"{checks.get('device')}, {checks.get('dtype')}, torch {checks.get('torch')}; not run: "
            f"{checks.get('skipped_implementations') or 'none'}", "", "| check | ok | seconds | figures |",
            "|---|---|---|---|"]
    for name, c in checks.get("checks", {}).items():
        figures = {k: v for k, v in c.items() if k not in ("ok", "seconds")}
        text = ", ".join(f"{k} {_num(v) if isinstance(v, float) else v}" for k, v in figures.items())
        rows.append(f"| {name} | {'yes' if c.get('ok') else 'NO'} | {c.get('seconds')} | {text} |")
    return rows


def timing_lines(results: dict[str, dict[str, Any]], ceiling: float | None) -> list[str]:
    header = ("| recipe | trainer | tokens/s | samples/s | MFU | MFU (median step) | MFU vs ceiling | peak GiB | "
              "data wait | step s (mean) | step s (median) | measured s | samples/step |")
    rows = [header, "|" + "---|" * 13]
    notes = []
    for recipe, r in results.items():
        for who in ("ours", "peer"):
            t = r.get(who)
            if t is None:
                continue
            med = t.get("median", {})
            vs = None if t.get("mfu") is None or not ceiling else t["mfu"] * PEAK_TFLOPS / ceiling
            rows.append(f"| {recipe} | {who} | {_num(t['tokens_per_s'])} | {_num(t['samples_per_s'])} | "
                        f"{_pct(t.get('mfu'))} | {_pct(med.get('mfu'))} | {_pct(vs)} | {_num(t.get('gpu_mem_gib'))} | "
                        f"{_pct(t.get('data_wait_frac'))} | {_num(t['step_time_s'])} | "
                        f"{_num(med.get('step_time_s'))} | {_num(t.get('total_time_s'))} | "
                        f"{_num(t['samples_per_step'])} |")
        line = (f"- {recipe}: {r.get('nproc')} process(es) on {r.get('device')}, {r.get('steps')} steps, the first "
                f"{r.get('warmup_steps')} left out")
        if "ratio" in r:
            line += f"; ours / peer: {r['ratio']['tokens_per_s']:.2f}x tokens/s, {r['ratio']['samples_per_s']:.2f}x "
            line += "samples/s"
        if "peer_error" in r:
            line += "; the peer did not finish: " + r["peer_error"].splitlines()[0]
        notes.append(line)
    if len(rows) == 2:
        return ["timing: no recipe finished (see the stages above and logs/)"]
    ceiling_text = f"{ceiling:.0f} TFLOP/s (the matmul check)" if ceiling else "not measured"
    return [*rows, "", f"MFU: model FLOPs over {PEAK_TFLOPS:.0f} TFLOP/s per GPU; vs ceiling: over {ceiling_text}.",
            *notes]


def main(argv: list[str]) -> int:
    work, out = Path(argv[0]), Path(argv[1])
    install, checks = _load(work / "install.json"), _load(work / "correctness.json")
    # pretrain bench train writes its result.json as soon as ours ends, again when the peer has: a stage stopped
    # during the peer still shows our figures.
    timing = {r: x for r in RECIPES for path in sorted((work / "bench" / r).glob("*/result.json"))[:1]
              if (x := _load(path)) is not None}
    matmul = (checks or {}).get("checks", {}).get("matmul", {})
    ceiling = matmul.get("tflops") if matmul.get("ok") and matmul.get("dtype") == "bfloat16" else None
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# gpu_bench ({os.environ.get('MODE', '?')} mode), {date}", "",
             f"- commit: {os.environ.get('PRETRAIN_COMMIT', 'unknown')}",
             f"- command: `{os.environ.get('COMMAND', 'bash tools/gpu_bench.sh')}`", "", "## Stages", "",
             *stages_table(work), "", "## Install", "", *install_lines(install), "", "## Correctness", "",
             *correctness_lines(checks), "", "## Timing", "", *timing_lines(timing, ceiling), ""]
    (out / "summary.md").write_text("\n".join(lines))
    merged = {"install": install, "correctness": checks, "train": timing,
              "bench_json": {r: _last_json_line(work / "logs" / f"{r}.log") for r in timing}}
    for extra in sorted(work.glob("*.json")):  # stages added later (their own JSON) come along
        if extra.stem not in ("install", "correctness"):
            merged[extra.stem] = _load(extra)
    (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    print(f"summary: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
