"""`lint-imports` (the layer contracts of pyproject.toml) over the package as it installs.

import-linter finds a package's modules on disk under the package's directory, while setuptools' package-dir mapping
installs folders from elsewhere in the tree inside it (launch/ -> pretrain.launch). So the contracts are checked in
a staged copy laid out as the installed package: each mapped folder copied to where its package name puts it.

    python tools/lint_imports.py [SOURCE_TREE]      # default: this checkout; exit code and output of lint-imports
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def stage(source: Path, into: Path) -> Path:
    """Copy the root packages and pyproject.toml of `source` into `into`, mapped folders placed as installed."""
    project = tomllib.loads((source / "pyproject.toml").read_text())
    roots = project["tool"]["importlinter"]["root_packages"]
    mapped = project["tool"].get("setuptools", {}).get("package-dir", {})
    ignore = shutil.ignore_patterns("__pycache__")
    for name in roots:
        shutil.copytree(source / name, into / name, ignore=ignore)
    for package, folder in sorted(mapped.items()):  # parents before their children
        shutil.copytree(source / folder, into.joinpath(*package.split(".")), ignore=ignore)
    shutil.copy(source / "pyproject.toml", into / "pyproject.toml")
    return into


def main(argv: list[str]) -> int:
    source = Path(argv[0]).resolve() if argv else ROOT
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="lint-imports-") as tmp:
        tree = stage(source, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(tree)}  # the staged packages before any installed copy
        return subprocess.run([str(lint), "--no-cache"], cwd=tree, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
