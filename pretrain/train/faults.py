"""Fault injection for the tests of the failure paths (a NaN loss, a rank that dies, a save killed half-way).

Read from the PRETRAIN_TEST_FAULTS environment variable (JSON); empty in any real run. Kept in one place so the
trainer's own code stays free of test branches.
"""

from __future__ import annotations

import json
import os
import signal

ENV = "PRETRAIN_TEST_FAULTS"


class Faults:
    def __init__(self) -> None:
        spec = json.loads(os.environ.get(ENV, "") or "{}")
        self.nan_steps = set(spec.get("nan_steps", []))
        self.die = spec.get("die")  # {"rank": r, "step": s}
        self.kill_in_save = spec.get("kill_in_save")  # {"rank": r, "step": s}: SIGKILL after the shards, pre-commit

    def loss_is_nan(self, step: int) -> bool:
        return step in self.nan_steps

    def maybe_die(self, rank: int, step: int) -> None:
        if self.die and self.die["rank"] == rank and self.die["step"] == step:
            os._exit(13)

    def maybe_kill_in_save(self, rank: int, step: int) -> None:
        if self.kill_in_save and self.kill_in_save["rank"] == rank and self.kill_in_save["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
