"""Cluster signals: SIGUSR1 / SIGTERM ask for a checkpoint and a "resume me" exit; a second one exits at once.

The first signal only sets a flag: the trainer finishes the step in flight, all ranks agree (an all-reduce every
step), save a committed checkpoint and exit with EXIT_PREEMPTED (75). A second signal means the sender will not
wait (a scheduler's last warning before SIGKILL, a user who insists): exit 75 at once; the last committed
checkpoint stands and `latest` names it.

One event often arrives twice within milliseconds: a signal sent to a whole process group reaches a worker directly
and again through torchrun, which forwards SIGTERM to its workers. A repeat within REPEAT_WINDOW_S of the first
counts as that same request, not as the second one.

DataLoader workers ignore these signals (pretrain.data.loader's worker_init_fn), so a signal sent to every process
of a job step does not take the batches of the step in flight away first.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from pretrain.exit_codes import EXIT_PREEMPTED

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REPEAT_WINDOW_S = 3.0


class StopRequest:
    def __init__(self, marker: Path | None = None) -> None:
        """`marker`: the PREEMPTED file rank 0 leaves for the launcher when it exits on a second signal."""
        self.signal: int | None = None
        self.marker = marker
        self._at = 0.0

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._at = signum, now
            os.write(2, f"signal {signum}: finishing this step, then checkpoint and exit {EXIT_PREEMPTED}\n".encode())
            return
        if now - self._at < REPEAT_WINDOW_S:
            return  # the same event delivered twice (group signal + torchrun's forwarding)
        # Second signal: the sender insists. Leave now; the last committed checkpoint stands.
        os.write(2, f"second signal {signum}: exiting at once with {EXIT_PREEMPTED}; resume from the last committed "
                    "checkpoint\n".encode())
        if self.marker is not None:
            try:
                self.marker.write_text("second signal\n")
            except OSError:
                pass
        os._exit(EXIT_PREEMPTED)

    @property
    def requested(self) -> bool:
        return self.signal is not None
