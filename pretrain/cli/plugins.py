"""Plug-ins: modules named in PRETRAIN_PLUGINS (comma-separated, importable: installed or on PYTHONPATH) that a
`pretrain` command loads before its own work (the ranks a launcher starts are `pretrain train` processes that
inherit the variable). Each module defines `activate(command: str) -> None`, called with the sub-command's name
(`train`, `eval`, `launch`, ...); what it does there is its own business: wrap a function for profiling, add a log
handler, patch a library. Importing the module should be cheap; `activate` does the work for the commands it is
about.
"""

from __future__ import annotations

import importlib
import os

from pretrain.config import ConfigError

ENV = "PRETRAIN_PLUGINS"


def activate_plugins(command: str) -> list[str]:
    """Import every module PRETRAIN_PLUGINS names and call its `activate(command)`; returns their names. A name
    that does not import, or a module without `activate`, is a ConfigError naming it."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{ENV}: plug-in {name!r} does not import ({err}); name an importable module "
                              "(installed, or on PYTHONPATH)") from err
        activate = getattr(module, "activate", None)
        if not callable(activate):
            raise ConfigError(f"{ENV}: plug-in {name!r} ({module.__file__}) defines no activate(command)")
        activate(command)
    return names
