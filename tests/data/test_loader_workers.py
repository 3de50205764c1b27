"""`data.num_workers: auto` (the CPUs given to the rank, minus its main process) and the validation loader decoding
in a worker process."""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch
from helpers.runs import write_config
from pydantic import ValidationError

from pretrain.config import DataConfig, load_config
from pretrain.data.loader import ResumableLoader
from pretrain.model.attention import flex_row_widths
from pretrain.model.build import build_model, load_tokenizer
from pretrain.model.processing import image_processor_for, sample_processor
from pretrain.train.engine import VAL_WORKERS, cpus_for_rank, loader_workers, make_loader

CPUS = len(os.sched_getaffinity(0))


def test_auto_workers_follow_the_cpus_given_to_the_rank():
    assert cpus_for_rank({}) == CPUS
    assert loader_workers("auto", {}) == CPUS - 1
    assert loader_workers(3, {}) == 3
    # One Slurm task per rank: --cpus-per-task caps it (here below the machine's CPUs).
    assert loader_workers("auto", {"SLURM_CPUS_PER_TASK": "1"}) == 0
    # torchrun starts the node's ranks with one shared affinity set: each gets its share, at least one CPU.
    ranks = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    assert cpus_for_rank(ranks) == max(CPUS // 2, 1)
    assert loader_workers("auto", {**ranks, "LOCAL_WORLD_SIZE": str(4 * CPUS)}) == 0
    assert DataConfig(train=[{"urls": "a.tar"}], num_workers="auto").num_workers == "auto"
    for bad in ("many", -1):
        with pytest.raises(ValidationError, match="num_workers"):
            DataConfig(train=[{"urls": "a.tar"}], num_workers=bad)


@pytest.mark.slow
def test_trainer_loaders_resolve_auto_and_validate_in_a_worker(tmp_path, assets, shapes):
    cfg = load_config(write_config(tmp_path / "c.yaml", assets, shapes, **{"data.num_workers": "auto"}))
    tokenizer = load_tokenizer(cfg.model)
    model_config = build_model(cfg.model, tokenizer).config
    processor = sample_processor(cfg, tokenizer, model_config, image_processor_for(cfg.model))
    train = make_loader(cfg, cfg.data.train, processor, tokenizer.pad_token_id, 0, 1, train=True)
    assert train.spec.num_workers == loader_workers("auto") == CPUS - 1
    val = make_loader(cfg, cfg.data.val, processor, tokenizer.pad_token_id, 0, 1, train=False)
    assert val.spec.num_workers == VAL_WORKERS == 1
    # The worker reads the same batches, in the same order, as decoding in the training process would.
    in_process = ResumableLoader(dataclasses.replace(val.spec, num_workers=0), processor)
    got, want = list(itertools.islice(val, 3)), list(itertools.islice(in_process, 3))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert torch.equal(g["input_ids"], w["input_ids"]) and g["sample_lengths"] == w["sample_lengths"]
    # Under flex_attention (compiled per shape) the trainer's loaders pad batches to a few widths only.
    assert val.spec.row_widths is None
    flex = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attn_implementation": "flex_attention"})})
    flex_val = make_loader(flex, flex.data.val, processor, tokenizer.pad_token_id, 0, 1, train=False)
    widths = flex_row_widths(cfg.data.max_length)
    assert flex_val.spec.row_widths == widths
    assert {b["input_ids"].shape[1] for b in itertools.islice(flex_val, 3)} <= set(widths)
