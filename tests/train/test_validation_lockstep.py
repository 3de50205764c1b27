"""2 ranks, ZeRO-3, validation over deliberately uneven shards (one rank's runs dry after one batch, the other's
lasts for all of them), in the same run as a non-finite step under gradient accumulation. Every ZeRO-3 forward
gathers parameters collectively: a rank that stopped validating while the other went on would hang, so the run
has a deadline."""

from __future__ import annotations

import json
import math

import pytest
from helpers.faults import fault_env
from helpers.runs import metrics, write_config
from helpers.trainer import finish, output, start_launch

from pretrain.shards.synthetic import write_synthetic

pytestmark = pytest.mark.slow


def _val_batches_per_rank(cfg_path, rank: int) -> int:
    """Batches of one single pass over the val shards for `rank` of 2, as the Validator's loader makes them."""
    from pretrain.config import load_config
    from pretrain.model.processing import build_processing
    from pretrain.train.engine import make_loader

    cfg = load_config(cfg_path)
    p = build_processing(cfg)
    return sum(1 for _ in make_loader(cfg, cfg.data.val, p.processor, p.tokenizer.pad_token_id, rank, 2, train=False))


def test_uneven_validation_shards_keep_ranks_in_lockstep_and_a_nonfinite_step_is_skipped_whole(
        tmp_path, assets, shapes):
    uneven = write_synthetic(tmp_path / "val", 0, 28, seed=1, samples_per_shard=24)  # val shards of 24 and 4
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{
        # Persistence threshold 0: every module call gathers its parameters, as a large model does.
        "deepspeed.zero_stage": 3, "deepspeed.param_persistence_threshold": 0, "train.grad_accum": 2,
        "train.val_every": 2, "train.val_batches": 4,
        "train.val_captions": 0, "data.val": [{"urls": uneven["val"]["urls"]}]})
    per_rank = sorted(_val_batches_per_rank(cfg, r) for r in (0, 1))
    assert per_rank[0] < 4 <= per_rank[1], per_rank  # the uneven case really occurs
    proc = start_launch(cfg, env=fault_env({"nan_steps": [3]}))
    assert finish(proc, cfg, 420) == 0, output(cfg)[-5000:]  # a hang kills the run's process tree and fails
    run = tmp_path / "run"
    vals = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals] == [2, 4, 6] and all(math.isfinite(v["val_loss"]) for v in vals)
    rows = {r["step"]: r for r in metrics(run)}
    assert rows[3]["loss"] is None and rows[6]["nonfinite_steps"] == 1
    assert all(math.isfinite(rows[s]["loss"]) for s in (4, 5, 6))  # no NaN reached the weights
