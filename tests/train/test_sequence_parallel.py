"""Ulysses sequence parallelism (deepspeed.sequence_parallel_size): the host-side shard of a batch, the per-sample
core attention, the configuration errors (in-process); on 4 CPU ranks (2 groups of 2, each group its own samples)
one training step against the same global batch without it: the same loss and the same update."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.model import ROOT, torchrun

from pretrain.config import ConfigError, DeepSpeedConfig
from pretrain.data.batching import collate
from pretrain.data.sample import ProcessedSample
from pretrain.model.sequence_parallel import (
    SequenceParallel,
    check_heads,
    gradient_divisor,
    segment_sdpa,
    shard_batch,
)
from pretrain.tokens import IGNORE


def _batch(width_pad: int = 1) -> dict:
    """Two rows: two packed samples (labels in each), and one sample + pad; an odd width."""
    def sample(n: int, labels: int) -> ProcessedSample:
        ids = list(range(10, 10 + n))
        return ProcessedSample(ids, [IGNORE] * (n - labels) + ids[n - labels:], None)

    return collate([[sample(6, 3), sample(7, 4)], [sample(5, 5)]], pad_id=0, pad_to_multiple=width_pad)


@pytest.mark.parametrize("size", [2, 4])
def test_shards_hold_every_label_row_once_at_its_local_position(size):
    batch = _batch()
    rows, width = batch["input_ids"].shape
    assert width % size  # the shards pad the row
    local = -(-width // size)
    seen = []
    for rank in range(size):
        shard = shard_batch(batch, SequenceParallel(None, rank, size))
        index = shard["label_index"]
        assert shard["n_labels"] == index.numel() == int((shard["labels"][:, 1:] != IGNORE).sum())
        # Back to whole-row positions: the same targets at the same places as the whole batch's.
        whole = (index // local) * width + rank * local + index % local
        assert bool(((index % local) < local).all())
        seen += list(zip(whole.tolist(), shard["label_targets"].tolist()))
    assert sorted(seen) == sorted(zip(batch["label_index"].tolist(), batch["label_targets"].tolist()))
    assert shard_batch(batch, None) is batch


def test_segment_attention_equals_the_sample_masked_attention():
    """The core attention (causal sdpa per sample and pad tail) against sdpa with the dense sample mask of
    pretrain.model.attention, GQA heads included; merged boundaries differ (the comparison can fail)."""
    from torch import nn

    from pretrain.model.attention import dense_document_mask

    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 8, generator=g)
    k, v = torch.randn(2, 2, 13, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    segments = [[5, 8], [9, 4]]  # two packed samples; one sample and its pad tail
    out, _ = segment_sdpa(module, q, k, v, segments, position_ids=torch.zeros(2, 13), dropout=0.0)
    mask = dense_document_mask(segments, q.device, q.dtype, boolean=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask).transpose(1, 2)
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-6)
    merged, _ = segment_sdpa(module, q, k, v, [[13], [13]], dropout=0.0)
    assert not torch.allclose(merged[0], want[0], atol=1e-3)


def test_configuration_errors_name_the_numbers():
    ds = DeepSpeedConfig(sequence_parallel_size=4)
    assert ds.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=4 does not divide the world size \(6 ranks\)"):
        ds.data_parallel_size(6)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=4 must divide the decoder's attention heads \(6\)"):
        check_heads(4, 6, 2)
    with pytest.raises(ConfigError, match=r"KV heads \(6\)"):
        check_heads(4, 12, 6)
    check_heads(4, 8, 2)  # KV heads replicated over the group
    check_heads(1, 7, 7)
    assert gradient_divisor(3, 8, 4) == 8 and gradient_divisor(2, 8, 4) == 2


def test_config_batch_and_preflight_speak_of_data_parallel_size(tmp_path, assets, shapes):
    from helpers.runs import write_config

    from pretrain.config import load_config
    from pretrain.train.ds_config import build_ds_config
    from pretrain.train.preflight import problems

    path = write_config(tmp_path / "c.yaml", assets, shapes, **{"train.global_batch_size": 8})
    cfg = load_config(path, ["deepspeed.sequence_parallel_size=2"])
    cfg.check_world_size(4)  # 4 ranks = 2 data-parallel x 2: micro-batch 4 x 2
    with pytest.raises(ConfigError, match="world size"):
        cfg.check_world_size(2)
    ds = build_ds_config(cfg, 4)
    assert ds["train_batch_size"] == 8 and ds["sequence_parallel_size"] == 2
    assert ds["zero_optimization"]["reduce_scatter"] is True
    wide = load_config(path, ["deepspeed.sequence_parallel_size=8", "train.global_batch_size=4"])
    assert any("attention heads (4)" in p for p in problems(wide, 8))
    with pytest.raises(ValueError, match="alignment"):
        load_config(path, ["deepspeed.sequence_parallel_size=2", "objectives.contrastive_weight=0.5"])


@pytest.mark.slow
def test_sequence_parallel_step_equals_the_whole_sequence_step(tmp_path, assets):
    out = tmp_path / "report"
    args = ["--llm", str(assets["llama"]), "--vision", str(assets["siglip"]), "--out", str(out), "--sp", "2"]
    done = torchrun(ROOT / "tests" / "helpers" / "sequence_parallel_worker.py", args, nproc=4, timeout=420)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in range(4)]
    # The two groups hold different samples (uneven label counts and widths): lockstep held, and each group's two
    # shards split its label rows.
    assert reports[0]["labels"] != reports[2]["labels"] and reports[0]["width"] != reports[2]["width"]
    for group in (reports[:2], reports[2:]):
        assert group[0]["shard_labels"] > 0 and group[1]["shard_labels"] > 0
        assert group[0]["shard_labels"] + group[1]["shard_labels"] == group[0]["labels"]
    for r in reports:
        assert r["start_diff"] == 0.0 and r["parameters"] > 50
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5 * abs(r["ref_loss"]), r
        assert r["grad_rel_diff"] < 1e-4, r


@pytest.mark.slow
def test_resume_from_a_sequence_parallel_checkpoint_without_it_trains_the_epoch_once(tmp_path, assets, shapes):
    """2 ranks as one group of 2 (packed rows, images) save at step 1; 1 rank without sequence parallelism (the
    same data-parallel layout; DeepSpeed's universal checkpoint for the other world size) resumes and runs past the
    end of the epoch. The group's ranks read the same samples; the epoch is trained once."""
    from collections import Counter

    from helpers.runs import launch, losses, write_config

    from pretrain.data.stream import ShardReader
    from pretrain.data.urls import expand_urls

    shard = expand_urls(shapes["train"]["urls"])[:1]
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{
        "data.train": [{"urls": shard}], "data.packing": True, "data.record_samples": True,
        "train.micro_batch_size": 8, "train.max_steps": 200, "checkpoint.every_steps": 1,
        "deepspeed.sequence_parallel_size": 2})
    # The group also validates (its loss over the shards) and generates a caption (the whole sequence per rank).
    first = launch(cfg, nproc=2, overrides=["train.stop_at_step=1", "train.val_every=1", "train.val_batches=1",
                                            "train.val_captions=1", "train.val_caption_tokens=4"])
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    run = tmp_path / "run"
    (val,) = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines()]
    assert math.isfinite(val["val_loss"]) and len(val["captions"]) == 1

    def records() -> dict[int, list[dict]]:
        return {int(p.stem[4:]): [json.loads(x) for x in p.read_text().splitlines()]
                for p in sorted((run / "samples").glob("rank*.jsonl"))}

    head = records()
    assert head[0] == head[1] and len(head[0]) == 1  # one group: both ranks trained the same rows
    second = launch(cfg, nproc=1, timeout=400, overrides=["deepspeed.sequence_parallel_size=1",
                                                          "train.stop_at_step=6"])
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-5000:]
    assert "it was written by 2" in text
    lines = records()[0]
    assert [line["step"] for line in lines] == list(range(1, 7))
    keys = Counter((k["shard"], k["key"]) for line in lines for k in line["keys"] if k["epoch"] == 0)
    every = Counter((url, key) for url in shard for key, _ in ShardReader()._local_index(url))
    assert keys == every  # the whole epoch, each sample once, across the two parts
    assert any(k["epoch"] == 1 for line in lines for k in line["keys"])  # and it had ended
    assert all(math.isfinite(v) for v in losses(run).values())
