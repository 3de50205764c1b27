"""Learning-rate schedules as multipliers of the base rate: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

log = logging.getLogger(__name__)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """A warm-up longer than the run (a recipe's shortened for a quick try) is clamped to the run, with a warning,
    as Hugging Face's Trainer accepts it too."""
    if warmup > total:
        log.warning("train.warmup_steps (%d) exceeds train.max_steps (%d): warm-up clamped to %d steps; the rate "
                    "rises linearly to train.lr over the whole run and no %s decay follows", warmup, total, total,
                    schedule)
        warmup = total
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
