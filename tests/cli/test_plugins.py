"""PRETRAIN_PLUGINS: the modules it names are imported and activated with the sub-command's name before the
command's own work; a name that does not import, or a module without `activate`, stops the command with exit 2 and
names it. (The fault-injection plug-in, tests/helpers/faults.py, runs through the same point in every fault test.)"""

from __future__ import annotations

import re
import sys

import pytest

from pretrain.cli import main
from pretrain.cli.plugins import activate_plugins

RECORDER = """
seen = []

def activate(command):
    seen.append(command)
    if command == "report":
        raise SystemExit(f"activated for {command} before the command ran")
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "recorder_plugin.py").write_text(RECORDER)
    (tmp_path / "inert_plugin.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("recorder_plugin", "inert_plugin"):
        sys.modules.pop(name, None)


def test_plugins_are_activated_with_the_command_before_it_runs(plugin_dir, monkeypatch):
    monkeypatch.setenv("PRETRAIN_PLUGINS", " recorder_plugin, ")
    assert activate_plugins("train") == ["recorder_plugin"]
    assert sys.modules["recorder_plugin"].seen == ["train"]
    # Through the command: activated with its name, before its handler (which would fail on a missing run).
    with pytest.raises(SystemExit, match="activated for report before the command ran"):
        main(["report", str(plugin_dir / "no-such-run")])
    monkeypatch.delenv("PRETRAIN_PLUGINS")
    assert activate_plugins("train") == []


@pytest.mark.parametrize("name, message", [("no_such_plugin_module", "'no_such_plugin_module' does not import"),
                                           ("inert_plugin", "'inert_plugin' .* defines no activate")])
def test_a_plugin_that_cannot_be_activated_stops_the_command(plugin_dir, monkeypatch, capsys, name, message):
    monkeypatch.setenv("PRETRAIN_PLUGINS", name)
    assert main(["report", str(plugin_dir / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "pretrain report: PRETRAIN_PLUGINS: plug-in" in err
    assert re.search(message, err), err
