"""The package works without the source tree: a plain (non-editable) install, used from another directory, finds
its package data (the sbatch template `pretrain submit` renders, the recipe `pretrain demo` trains)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import ROOT

CONFIG = """\
run: {output_dir: OUT, name: installed}
model: {llm: {model_type: llama}, vision: {model_type: clip_vision_model}}
data: {train: [{urls: SHARD}]}
train: {max_steps: 10, micro_batch_size: 2}
"""
# Runs in the installed copy: proves where the code came from, then renders a job script.
SUBMIT = """\
import sys
import launch, pretrain
site = sys.argv[1]
assert launch.__file__.startswith(site) and pretrain.__file__.startswith(site), (launch.__file__, pretrain.__file__)
from pretrain.demo import DEMO_CONFIG
from pretrain.config import load_config
assert str(DEMO_CONFIG).startswith(site) and load_config(DEMO_CONFIG).run.name == "demo", DEMO_CONFIG
from pretrain.cli import main
sys.exit(main(["submit", sys.argv[2], "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--dry-run"]))
"""


def _install(tmp_path: Path) -> Path:
    """`pip install .` (not editable, no dependencies, offline) of a copy of the project into a target folder."""
    src, site = tmp_path / "src", tmp_path / "site"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pretrain", "launch"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    return site


@pytest.mark.slow
def test_submit_dry_run_from_a_plain_install_in_another_directory(tmp_path):
    site = _install(tmp_path)
    assert not (site / "slurm").exists() and not (tmp_path / "src" / "slurm").exists()  # no source tree to lean on
    assert (site / "launch" / "templates" / "train.sbatch").is_file()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "shards").mkdir(parents=True)
    (elsewhere / "shards" / "train-000000.tar").write_bytes(b"")  # submit checks that shards exist, never reads
    cfg = elsewhere / "config.yaml"
    cfg.write_text(CONFIG.replace("OUT", str(elsewhere / "run")).replace("SHARD", str(elsewhere / "shards" /
                                                                                     "train-000000.tar")))
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", SUBMIT, str(site), str(cfg)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "#SBATCH --nodes=1" in out.stdout and "\nsrun " in out.stdout, out.stdout
    assert "PREEMPTED_EXIT=75" in out.stdout, out.stdout  # the trainer's requeue exit, rendered from one constant
