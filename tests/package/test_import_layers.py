"""Imports run one way: the import-linter contract of pyproject.toml holds for the tree, and it does fail on an
upward import and on a cycle (planted in a copy of the tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy's packages come before the installed ones
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    # pretrain/launch, the link to launch/, is copied as the folder it points to.
    shutil.copytree(ROOT / "pretrain", tree / "pretrain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


@pytest.mark.slow
def test_the_tree_keeps_the_layers_and_a_planted_upward_import_or_cycle_breaks_them(tmp_path):
    kept = _lint(ROOT)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "The data flow, top to bottom KEPT" in kept.stdout and "0 broken" in kept.stdout, kept.stdout

    tree = _copy(tmp_path)
    _plant(tree / "pretrain" / "data" / "text.py", "from pretrain.model.build import load_tokenizer")  # data -> model
    _plant(tree / "pretrain" / "train" / "schedule.py", "from pretrain.train import trainer")  # trainer -> ... -> here
    _plant(tree / "pretrain" / "train" / "signals.py", "from pretrain.launch import restarts")  # train -> launch
    broken = _lint(tree)
    assert broken.returncode != 0, broken.stdout
    assert "pretrain.data is not allowed to import pretrain.model" in broken.stdout, broken.stdout
    assert "pretrain.data.text -> pretrain.model.build" in broken.stdout, broken.stdout
    assert "No cycles are allowed in pretrain.train" in broken.stdout, broken.stdout
    # launch/ is checked as the package it installs as.
    assert "pretrain.train is not allowed to import pretrain.launch" in broken.stdout, broken.stdout
    assert "pretrain.train.signals -> pretrain.launch.restarts" in broken.stdout, broken.stdout
