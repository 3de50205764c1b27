"""The vision tower's work split across a sequence-parallel group (pretrain.model.vision_split): the padding and
slicing arithmetic in-process; on 2 gloo ranks, the split features and the tower/projector gradients equal the
plain ones, with each rank's tower taking 1/N of the tiles; under ZeRO-3 too."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.model import ROOT, torchrun
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pretrain.model.vision_split import SplitTower, encode_split, gather_rows, rank_slice, rows_per_rank


def test_every_tile_goes_to_exactly_one_rank_and_every_rank_takes_the_same_count():
    for world in (1, 2, 3, 4):
        for count in range(0, 10):
            per = rows_per_rank(count, world)
            assert per >= 1 and per * world >= count and (per - 1) * world < max(count, 1)
            pixels = torch.arange(1, count + 1, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, 2, 2)
            slices = [rank_slice(pixels, r, world) for r in range(world)]
            assert all(s.shape == (per, 3, 2, 2) for s in slices)
            taken = torch.cat(slices)[:, 0, 0, 0]
            assert taken[:count].tolist() == list(range(1, count + 1))  # in order, each once
            assert (taken[count:] == 0).all()  # the padding is black tiles
    with pytest.raises(ValueError, match="world 0"):
        rows_per_rank(3, 0)


def test_without_a_process_group_the_split_call_is_the_plain_call():
    tower = torch.nn.Linear(4, 6)
    pixels = torch.randn(5, 4)
    assert torch.equal(encode_split(tower, pixels, None), tower(pixels))
    empty = encode_split(tower, pixels[:0], None)
    assert empty.shape == (0, 6)  # one (black) tile ran; none comes back
    with pytest.raises(ValueError, match="per-tile"):
        gather_rows(torch.ones(()), 1, 1, None)


def test_the_split_tower_gathers_only_the_hidden_states_the_model_reads():
    class Tower(torch.nn.Module):
        def forward(self, pixels, **kwargs):
            states = tuple(pixels * k for k in range(4))
            return BaseModelOutputWithPooling(last_hidden_state=states[-1], pooler_output=pixels.sum(1),
                                              hidden_states=states)

    pixels = torch.randn(3, 2)
    out = SplitTower(Tower(), None, -2)(pixels, output_hidden_states=True)
    assert out.last_hidden_state is None and out.pooler_output is None
    assert [s is None for s in out.hidden_states] == [True, True, False, True]
    assert torch.equal(out.hidden_states[-2], pixels * 2)
    both = SplitTower(Tower(), None, [0, -1])(pixels).hidden_states
    assert [s is None for s in both] == [False, True, True, False]


@pytest.mark.slow
def test_split_features_and_gradients_equal_the_unsplit_ones_on_two_ranks(tmp_path):
    done = torchrun(ROOT / "tests" / "helpers" / "vision_split_worker.py", ["--out", str(tmp_path / "r")],
                    timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"r.rank{r}.json").read_text()) for r in range(2)]
    # (tiles in the micro-batch, tiles each rank's tower takes): 3 tiles -> 2 + (1 and a black one); a text-only
    # micro-batch runs the one dummy image -> 1 + 1 (black); AnyRes 3 tiles + 4 frames -> 4 + 4.
    expect = {"tiles3": (3, 2), "text_only": (1, 1), "tiles3_frozen": (3, 2), "anyres_video": (7, 4)}
    for out in ranks:
        for name, (tiles, per_rank) in expect.items():
            c = out[name]
            assert c["plain_rows"] == [tiles] and c["split_rows"] == [per_rank], (name, c)
            assert c["features"] > 0 and c["feature_diff"] < 1e-5, (name, c)
            assert c["grad_diff"] < 1e-5 and c["projector_grad_norm"] > 0, (name, c)
        for name in ("tiles3", "text_only", "anyres_video"):  # the trainable tower's gradients are in the comparison
            assert out[name]["tower_params_with_grad"] > 10, (name, out[name])  # (none past the feature layer)
        assert out["tiles3_frozen"]["tower_params"] == 0
        z = out["zero3"]  # a partitioned, trained tower under ZeRO-3: 3 tiles -> 2 per rank, the same step
        assert z["rows"] == [[3], [2]] and z["losses"][0] == pytest.approx(z["losses"][1], rel=1e-6), z
        assert z["grad_diff"] < 1e-5, z
        assert out["no_tiles"] == {"rows": [1], "shape": [0, 17, 64]}  # CLS + 4 x 4 patches
