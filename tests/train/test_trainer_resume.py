"""Resume on fewer ranks (DeepSpeed's universal checkpoint) and a disk that fills up during a save."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers.consolidate import STATES, consolidate
from helpers.faults import fault_env
from helpers.runs import launch, losses, write_config
from helpers.trainer import cut_back_to, may_mount, probe_resume, small_tmpfs

from pretrain.exit_codes import EXIT_PREEMPTED
from pretrain.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _first_loss_from(weights: dict, cfg_path, ckpt_dir) -> float:
    """The loss of the first step after a resume on 1 rank, computed without DeepSpeed: a plain model holding
    `weights`, on the micro-batches the resumed loader hands out first (the rest of the epoch, split anew)."""
    from pretrain.config import load_config
    from pretrain.model.build import build_model
    from pretrain.model.processing import build_processing
    from pretrain.model.vlm import VLMForTraining
    from pretrain.train.engine import make_loader
    from pretrain.train.resume import SavedRanks

    cfg = load_config(cfg_path)
    processing = build_processing(cfg)
    module = VLMForTraining(build_model(cfg.model, processing.tokenizer), cfg.objectives, seed=cfg.run.seed)
    missing = set(weights) - set(dict(module.named_parameters()))
    assert not missing, missing
    module.load_state_dict(weights, strict=False)  # frozen parameters keep the values they were built with
    loader = make_loader(cfg, cfg.data.train, processing.processor, processing.tokenizer.pad_token_id, 0, 1,
                         train=True)
    loader.load_state_dict(SavedRanks(ckpt_dir, 2).part("loader"))
    it = iter(loader)
    with torch.no_grad():
        sums = [module.eval()(next(it)) for _ in range(cfg.train.grad_accum)]
    return float(sum(t for t, _ in sums) / sum(n for _, n in sums))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_fewer_ranks_through_the_universal_checkpoint(tmp_path, reference_run, assets, shapes, stage):
    """A 2-rank checkpoint (step 3 of 6) resumed by one process with `checkpoint.resume: auto` (grad_accum 2 keeps
    the global batch). The trainer sees the world-size change, converts the checkpoint to DeepSpeed's universal
    format and loads it. What it loaded equals DeepSpeed's own consolidation of the ORIGINAL 2-rank shards
    (zero_to_fp32 for the weights, the same merge over the optimizer-state files for the Adam moments), exactly,
    for every trainable parameter. The loader splits the rest of the epoch over the new slot (elastic resume), so
    the batches, and so the losses, differ from the 2-rank run's; the first one equals, to float rounding, the loss
    a plain model with the consolidated weights gets on the batches the resumed loader hands out."""
    reference = reference_run(stage)
    run = tmp_path / "run"
    cut_back_to(reference, run, 3)
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"deepspeed.zero_stage": stage, "train.grad_accum": 2})
    report, out, loaded = probe_resume(cfg)
    assert report["universal"] and report["step"] == 3
    assert report["tensors"] > 0 and report["max_diff"] == 0.0 and report["norm"] > 0  # = the universal files
    original = consolidate(reference / "checkpoints" / ckpt.tag_for(3))
    for key in STATES:
        assert set(loaded[key]) == set(original[key]) and loaded[key], key
        for name, want in original[key].items():
            assert torch.equal(loaded[key][name], want.view_as(loaded[key][name])), (key, name)
    assert any(v.abs().sum() > 0 for v in original["exp_avg"].values())  # moments that were really trained
    assert "to DeepSpeed's universal format" in out
    assert "world size or workers changed" in out  # the loader splits the rest of the epoch anew
    got, want = losses(run), losses(reference)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in (1, 2, 3)] == [want[s] for s in (1, 2, 3)]
    first = _first_loss_from(original["fp32"], cfg, reference / "checkpoints" / ckpt.tag_for(3))
    assert got[4] == pytest.approx(first, rel=1e-5)
    for s in (5, 6):
        assert got[s] == pytest.approx(want[s], rel=0.05), (s, got[s], want[s])
    root = run / "checkpoints"
    assert (root / ckpt.tag_for(3) / "universal" / "zero").is_dir()
    assert ckpt.read_meta(root / ckpt.tag_for(6))["world_size"] == 1 and (run / "DONE").is_file()
    assert (root / ckpt.tag_for(6) / "config.yaml").is_file()  # the resolved config travels with the checkpoint


def test_disk_full_during_a_save_keeps_earlier_checkpoints(tmp_path, assets, shapes, record_property):
    """The run directory on a real 4 MiB tmpfs: the checkpoint of step 2 (~2.7 MB) fits, the one of step 4 does not.
    The run stops with an error that says "no space left" and names the checkpoint; step 2 stays committed and
    `latest`. Where this process may mount (root with CAP_SYS_ADMIN) the tmpfs is required; elsewhere ENOSPC is
    injected at rank 1's first DeepSpeed file of the save of step 4 instead, and the test says so (a warning and the
    `disk_full` property)."""
    with small_tmpfs(tmp_path / "disk", "4m") as (mounted, refusal):
        assert mounted or not may_mount(), f"mounting a tmpfs should be permitted here but failed: {refusal}"
        path = "a real 4 MiB tmpfs" if mounted else f"ENOSPC injected (mount refused: {refusal})"
        record_property("disk_full", path)
        print(f"disk full path: {path}")
        if not mounted:
            warnings.warn(f"disk-full test ran without a real full disk: {path}", stacklevel=1)
        run = tmp_path / "disk" / "run"
        cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"run.output_dir": str(run),
                                                                   "checkpoint.every_steps": 2})
        fault = {} if mounted else {"enospc_in_save": {"rank": 1, "step": 4}}
        out = launch(cfg, env=fault_env(fault), timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode not in (0, EXIT_PREEMPTED), text[-3000:]
        assert "no space left on device while saving checkpoint" in text, text[-5000:]
        assert str(run / "checkpoints" / ckpt.tag_for(4)) in text
        if mounted:  # the disk really was full: a write of the save failed with the disk (nearly) out of space
            free = float(re.search(r"\((\d+\.\d) MiB free in", text).group(1))
            assert free < 4.0
        root = run / "checkpoints"
        assert (root / "latest").read_text().strip() == ckpt.tag_for(2)
        assert ckpt.is_committed(root / ckpt.tag_for(2)) and ckpt.find_resume(root) == root / ckpt.tag_for(2)
        assert not (root / ckpt.tag_for(4)).exists() or not ckpt.is_committed(root / ckpt.tag_for(4))
        assert not (run / "DONE").exists()
