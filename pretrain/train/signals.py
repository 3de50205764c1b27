"""Cluster signals: SIGUSR1 / SIGTERM ask for a checkpoint and a "resume me" exit; a second one exits at once."""

from __future__ import annotations

import logging
import os
import signal

from pretrain.train.dist import EXIT_PREEMPTED

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.signal is not None:
            # Second signal: the user or the scheduler insists. Leave now; the last committed checkpoint stands.
            os.write(2, f"second signal {signum}: exiting at once\n".encode())
            os._exit(EXIT_PREEMPTED)
        self.signal = signum
        os.write(2, f"signal {signum}: finishing this step, then checkpoint and exit {EXIT_PREEMPTED}\n".encode())

    @property
    def requested(self) -> bool:
        return self.signal is not None
