"""ZeRO-3 lockstep on 2 CPU ranks with deliberately uneven data (tools/zero3_lockstep.py): label counts on both sides
of the loss-chunk boundary, a rank with no image and no alignment pair, a rank with no label at all. Run under a
timeout, so a forward whose module calls depend on the data fails here instead of hanging. In the same run,
flex_attention's training path (packed rows, non-reentrant checkpointing, backward, ZeRO-3) against sdpa."""

from __future__ import annotations

import json
import math

import pytest
from helpers.model import ROOT, torchrun

pytestmark = pytest.mark.slow
CHUNK = 8  # small, so short test texts still straddle the boundary


def test_uneven_ranks_stay_in_lockstep_under_zero3(tmp_path, assets):
    out = tmp_path / "report"
    args = ["--llm", str(assets["llama"]), "--vision", str(assets["siglip"]), "--out", str(out), "--chunk",
            str(CHUNK), "--long", "20", "--short", "5", "--steps", "2", "--collective-timeout-minutes", "2"]
    done = torchrun(ROOT / "tools" / "zero3_lockstep.py", args, timeout=360)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"report.rank{r}.json").read_text())["cases"] for r in range(2))
    even, uneven, empty = (r0["even"], r1["even"]), (r0["uneven"], r1["uneven"]), (r0["empty"], r1["empty"])
    # The uneven cases really occurred: per-chunk head calls would have been 5 on rank 0 and 1 on rank 1.
    assert uneven[0]["labels"] > 2 * CHUNK and 0 < uneven[1]["labels"] < CHUNK
    assert uneven[0]["images"] == uneven[0]["pairs"] == 2 and uneven[1]["images"] == uneven[1]["pairs"] == 0
    assert empty[1]["labels"] == 0 and empty[1]["images"] == 0
    assert even[0]["labels"] == even[1]["labels"] and even[1]["images"] == 2
    for case in (*even, *uneven, *empty):
        assert len(case["losses"]) == 2 and all(math.isfinite(x) for x in case["losses"])
    # flex_attention trains as sdpa does under ZeRO-3: the same loss and full gradients on each rank's packed rows,
    # and a merged-boundaries batch moves the loss (the comparison can fail).
    for flex in (r0["flex"], r1["flex"]):
        assert flex["loss_rel_diff"] < 1e-5 and flex["grad_rel_diff"] < 1e-4, flex
        assert flex["merged_rel_diff"] > 1e-3 and flex["parameters"] > 20, flex
