"""The test-fault switch: a JSON object in PRETRAIN_TEST_FAULTS, empty in any real run. Read here only, a leaf, so
the model (which may not import the trainer) and the trainer's fault injection (pretrain.train.faults) read the same
switch the same way."""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "PRETRAIN_TEST_FAULTS"


def fault_spec() -> dict[str, Any]:
    """The faults the tests asked for ({} when none)."""
    return json.loads(os.environ.get(ENV, "") or "{}")
