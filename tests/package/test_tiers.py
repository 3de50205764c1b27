"""The fast tier (`make test-fast`) starts no process: its guard fails a test that starts one without the `slow` or
`slurm` marker, in the test's body or in a fixture it sets up, and lets a marked one run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.runs import ROOT

_TESTS = '''
import subprocess
import pytest

@pytest.fixture
def started():
    return subprocess.run(["true"]).returncode

def test_unmarked_body():
    subprocess.run(["true"])

def test_unmarked_fixture(started):
    pass

@pytest.mark.slow
def test_marked(started):
    subprocess.run(["true"])

def test_no_process():
    assert True
'''


@pytest.mark.slow
def test_the_guard_fails_unmarked_spawns_and_lets_marked_ones_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(_TESTS)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "helpers.no_spawn", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"})
    summary = out.stdout.strip().splitlines()[-1]
    for count in ("1 failed", "2 passed", "1 error"):  # the fixture's spawn errs in set-up
        assert count in summary, out.stdout + out.stderr
    assert "test_unmarked_body starts a process (subprocess)" in out.stdout
    assert "test_unmarked_fixture starts a process (subprocess)" in out.stdout
