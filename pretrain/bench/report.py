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
    """`git rev-parse HEAD` of the checkout, `+changes` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


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


def environment() -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "versions": _versions(), "commit": _commit(),
            "command": " ".join(["pretrain", *map(shlex.quote, sys.argv[1:])])}


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


def record(path: str | Path, title: str, env: dict[str, Any], body: str) -> None:
    """Append one entry to a results file (benchmarks/RESULTS.md): the figures and how they were made."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    entry = (f"\n### {title} ({env['date']})\n\n- machine: {env['machine']}\n- versions: {versions}\n"
             f"- commit: {env['commit']}\n- command: `{env['command']}`\n\n{body}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with open(path, "a") as f:
        f.write(entry)
