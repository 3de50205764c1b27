"""The batch width and the label count, each computed in one place that the loader, the step and the planner share."""

from __future__ import annotations

import torch

from pretrain.data.batching import collate, label_count, padded_width
from pretrain.data.sample import ProcessedSample
from pretrain.plan.lengths import SampleCost, batch_mix
from pretrain.tokens import IGNORE


def _sample(n: int, labelled: int) -> ProcessedSample:
    return ProcessedSample(list(range(1, n + 1)), [IGNORE] * (n - labelled) + list(range(labelled)), None)


def test_the_width_is_the_longest_row_rounded_up_then_the_smallest_compiled_width_holding_it() -> None:
    assert padded_width([5, 9]) == 16 and padded_width([16]) == 16 and padded_width([3], 4) == 4
    assert padded_width([9], widths=(12, 32, 64)) == 32 and padded_width([70], widths=(32, 64)) == 72


def test_collate_the_step_and_the_planner_agree_on_width_and_labels() -> None:
    rows = [[_sample(7, 3)], [_sample(13, 5)]]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].shape == (2, 16) == (2, padded_width([7, 13]))
    assert label_count(batch["labels"]) == batch["n_labels"] == 3 + 5
    assert label_count(rows[0][0].labels) == 3 and label_count(torch.tensor(rows[1][0].labels)) == 5
    assert label_count(_sample(4, 4).labels) == 3  # a label at the first position has no token before it
    mix = batch_mix([SampleCost(7, 0, 3), SampleCost(13, 0, 5)], 2, 64, packing=False)
    assert mix.padded_tokens == batch["input_ids"].numel() and mix.labels == batch["n_labels"]
