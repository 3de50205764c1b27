"""The fast tier's guard (`make test-fast` loads it with `-p helpers.no_spawn`): a test that starts a process
(subprocess, multiprocessing, DataLoader workers, torchrun, Slurm), in its body or in a fixture it sets up, while not
marked `slow` or `slurm` fails, naming what it started. The fast tier selects on those markers
(`-m "not slow and not slurm"`), so this keeps them true."""

from __future__ import annotations

import multiprocessing.process
import subprocess
from pathlib import Path

import pytest

_SPAWN_MARKERS = ("slow", "slurm")
_CHEAP = {"git"}  # a commit id read for a benchmark's provenance costs milliseconds
_current: dict[str, str | None] = {"test": None}  # the running test that may not spawn, None when it may


def _guarded(what: str, original):
    def start(self, *args, **kwargs):
        command = args[0] if args else None
        program = Path(str(command[0] if isinstance(command, (list, tuple)) else command)).name
        if _current["test"] is not None and program not in _CHEAP:
            raise RuntimeError(
                f"{_current['test']} starts a process ({what}) but is not marked slow or slurm: mark it "
                "@pytest.mark.slow (the fast tier starts no process)"
            )
        return original(self, *args, **kwargs)

    return start


def pytest_configure(config):
    subprocess.Popen._execute_child = _guarded("subprocess", subprocess.Popen._execute_child)
    multiprocessing.process.BaseProcess.start = _guarded("multiprocessing", multiprocessing.process.BaseProcess.start)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    may_spawn = any(item.get_closest_marker(name) for name in _SPAWN_MARKERS)
    _current["test"] = None if may_spawn else item.nodeid
    yield
    _current["test"] = None
