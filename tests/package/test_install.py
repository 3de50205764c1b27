"""The package works as installed: a plain (non-editable) install into a fresh virtual environment that also holds
another distribution's top-level `launch` package puts one root package, `pretrain` (launch/ inside it as
pretrain.launch), into site-packages, leaves the other `launch` alone, and `pretrain submit --dry-run` run from
another directory finds its package data (the sbatch template, the demo recipe) in the installed copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers.runs import ROOT

CONFIG = """\
run: {output_dir: OUT, name: installed}
model: {llm: {model_type: llama}, vision: {model_type: clip_vision_model}}
data: {train: [{urls: SHARD}]}
train: {max_steps: 10, micro_batch_size: 2}
"""
# Another distribution's `launch` (ROS 2 and PyPI ship one), installed beside ours.
OTHER_LAUNCH = {
    "pyproject.toml": '[project]\nname = "other-launch"\nversion = "1.0"\n[tool.setuptools]\npackages = ["launch"]\n',
    "launch/__init__.py": 'OWNER = "other-launch"\n',
}
# Runs in the new environment: where each package came from.
PROBE = """\
import sys
import launch, pretrain, pretrain.launch
from pretrain.launch.slurm import TEMPLATE
site = sys.argv[1]
assert launch.OWNER == "other-launch", launch.__file__
for path in (pretrain.__file__, pretrain.launch.__file__, str(TEMPLATE)):
    assert path.startswith(site + "/pretrain/"), path
"""


def _venv(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh environment (no pip of its own) that sees this environment's packages after its own; (python,
    site-packages)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    (site / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")  # a path line: its .pth files stay unread
    return python, site


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the project (no build leftovers) and of the other `launch` distribution."""
    ours, other = tmp_path / "src", tmp_path / "other"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pretrain", "launch"):
        shutil.copytree(ROOT / name, ours / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, ours / name)
    for name, text in OTHER_LAUNCH.items():
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_text(text)
    return ours, other


def _installed_roots(site: Path) -> set[str]:
    record = next(site.glob("pretrain-*.dist-info")) / "RECORD"
    return {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}


@pytest.mark.slow
def test_plain_install_beside_another_launch_package_submits_from_another_directory(tmp_path):
    python, site = _venv(tmp_path)
    ours, other = _sources(tmp_path)
    # Both in one pip run (offline, not editable); --ignore-installed: the outer environment's editable pretrain
    # is not this environment's to uninstall.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
                    "--ignore-installed", "--no-compile", str(ours), str(other)],
                   check=True, capture_output=True, timeout=300)
    assert not (ours / "slurm").exists()  # no source tree to lean on

    assert _installed_roots(site) == {"pretrain", next(site.glob("pretrain-*.dist-info")).name, ".."}  # .. = bin/
    for init in (ROOT / "pretrain").rglob("__init__.py"):  # every package of the tree is in the install
        assert (site / init.relative_to(ROOT)).is_file(), init
    assert {p.name for p in (site / "pretrain" / "launch").iterdir()} >= {p.name for p in (ROOT / "launch").iterdir()}
    assert (site / "pretrain" / "recipes" / "demo.yaml").is_file()  # what `pretrain demo` trains

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "shards").mkdir(parents=True)
    shard = elsewhere / "shards" / "train-000000.tar"
    shard.write_bytes(b"")  # submit checks that shards exist, never reads them
    cfg = elsewhere / "config.yaml"
    cfg.write_text(CONFIG.replace("OUT", str(elsewhere / "run")).replace("SHARD", str(shard)))
    probe = subprocess.run([str(python), "-c", PROBE, str(site)], cwd=elsewhere, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    out = subprocess.run([str(python.with_name("pretrain")), "submit", str(cfg), "--nodes", "1", "--gpus-per-node",
                          "0", "--tasks-per-node", "2", "--dry-run"], cwd=elsewhere, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "#SBATCH --nodes=1" in out.stdout and "\nsrun " in out.stdout, out.stdout
    assert "PREEMPTED_EXIT=75" in out.stdout, out.stdout  # the trainer's requeue exit, rendered from one constant
    assert '"$PYTHON" -m pretrain.launch.restarts after' in out.stdout, out.stdout  # the job's restart policy
