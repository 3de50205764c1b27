"""`pretrain --help` and every `pretrain SUBCOMMAND --help` import no library code (torch, transformers, pydantic,
deepspeed, webdataset take seconds to import): help is instant. Its time is measured by the command in
benchmarks/RESULTS.md, not here. The launcher (`pretrain launch`, and the requeue decision a Slurm job runs after each
step) imports no torch either: it starts before every training run, and torchrun's workers import their own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.runs import ROOT

HEAVY = ("torch", "transformers", "pydantic", "deepspeed", "webdataset", "yaml")

_SCRIPT = """
import json, sys
from pretrain.cli import COMMANDS, build_parser, main
helps = [[]] + [[c] for c in COMMANDS if c != "verify"] + [["shards", s] for s in
         ("synthetic", "llava", "jsonl", "folder", "interleaved", "inspect", "verify")]
shown = {}
for words in helps:
    try:
        main([*words, "--help"])
    except SystemExit as e:
        shown[" ".join(words)] = e.code
heavy = [m for m in %r if m in sys.modules]
import launch.local, launch.restarts
print(json.dumps({"shown": shown, "heavy": heavy, "launcher": [m for m in ("torch", "deepspeed") if m in sys.modules]}))
"""


@pytest.mark.slow
def test_help_imports_no_library_code():
    out = subprocess.run([sys.executable, "-c", _SCRIPT % (HEAVY,)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["shown"].values()) == {0} and len(result["shown"]) == 19, result["shown"]
    assert "plan" in result["shown"] and "report" in result["shown"] and "shards verify" in result["shown"]
    assert result["heavy"] == [], result["heavy"]
    assert result["launcher"] == [], result["launcher"]
    assert "a100-40gb" in subprocess.run([sys.executable, "-m", "pretrain", "plan", "--help"], capture_output=True,
                                         text=True, timeout=120, cwd=ROOT).stdout
