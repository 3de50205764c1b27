"""What every benchmark figure is recorded with: date, machine, versions, commit and the exact command."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "webdataset", "pillow", "tokenizers")
ROOT = Path(__file__).resolve().parents[2]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def _commit() -> str:
    """`git rev-parse HEAD` of the checkout, `+changes` when the work tree differs from it; where there is no git
    checkout (a copy of the tree on a GPU machine), PRETRAIN_COMMIT (tools/gpu_bench.sh sets it from .whl/COMMIT,
    written by tools/gpu_commit.sh before the copy)."""
    fallback = os.environ.get("PRETRAIN_COMMIT", "unknown")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return fallback
    return head + ("+changes" if dirty else "") if head else fallback


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    cpu = f"{_cpu_name()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}; {cpu}"
    return f"no GPU; {cpu}"


def environment(command: list[str] | None = None) -> dict[str, Any]:
    """`command`: the words of the command line (default: this process's)."""
    words = command if command is not None else ["pretrain", *sys.argv[1:]]
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "versions": _versions(), "commit": _commit(),
            "command": " ".join(map(shlex.quote, words))}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def record(path: str | Path, section: str, title: str, env: dict[str, Any], body: str) -> None:
    """Add one entry to a results file (benchmarks/RESULTS.md): the figures and how they were made, at the end of
    its `## {section}` (created at the end of the file when missing), so entries of one benchmark stay together
    whatever else the file holds."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    entry = (f"### {title} ({env['date']})\n\n- machine: {env['machine']}\n- versions: {versions}\n"
             f"- commit: {env['commit']}\n- command: `{env['command']}`\n\n{body}\n\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines(keepends=True) if path.exists() else ["# Benchmark results\n", "\n"]
    heading = f"## {section}\n"
    if heading not in lines:
        lines += ["\n"] * (bool(lines) and lines[-1].strip() != "") + [heading, "\n"]
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    if end > 0 and lines[end - 1].strip():
        entry = "\n" + entry
    lines.insert(end, entry)
    path.write_text("".join(lines))
