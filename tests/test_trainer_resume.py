"""Resume on fewer ranks (DeepSpeed's universal checkpoint) and a disk that fills up during a save."""

from __future__ import annotations

import json
import shutil

import pytest
from _trainer_fixtures import probe_resume, small_tmpfs
from conftest import launch, losses, metrics, write_config
from test_train import _reference_run

from pretrain.train import checkpoint as ckpt
from pretrain.train.dist import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def _cut_back_to(reference, run, step: int) -> None:
    """A copy of a finished run as it was when the checkpoint of `step` was the newest (the cluster then shrank)."""
    shutil.copytree(reference, run)
    root = run / "checkpoints"
    for tag in ckpt.tags(root):
        if ckpt.step_of(tag) > step:
            shutil.rmtree(root / tag)
    (root / "latest").write_text(ckpt.tag_for(step))
    (run / "DONE").unlink()
    rows = [r for r in metrics(run) if r["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_fewer_ranks_through_the_universal_checkpoint(tmp_path, tmp_path_factory, assets, shapes, stage):
    """A 2-rank checkpoint (step 3 of 6) resumed by one process with `checkpoint.resume: auto` (grad_accum 2 keeps
    the global batch). The trainer sees the world-size change, converts the checkpoint to DeepSpeed's universal
    format and loads it: the Adam moments it holds equal the 2-rank ones exactly (every parameter). The losses that
    follow are close to the 2-rank run's, not equal: the rest of the epoch is split over the new slot (elastic
    resume), so the batches differ, and sums reduce in another order."""
    reference = _reference_run(tmp_path_factory, assets, shapes, stage)
    run = tmp_path / "run"
    _cut_back_to(reference, run, 3)
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"deepspeed.zero_stage": stage, "train.grad_accum": 2})
    report, out = probe_resume(cfg)
    assert report["universal"] and report["step"] == 3
    assert report["tensors"] > 0 and report["max_diff"] == 0.0 and report["norm"] > 0  # optimizer state kept
    assert "to DeepSpeed's universal format" in out
    assert "world size or workers changed" in out  # the loader splits the rest of the epoch anew
    got, want = losses(run), losses(reference)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], rel=0.05), (s, got[s], want[s])
    assert want[1] - got[4] > 0.3  # trained weights were loaded: far below the loss of the fresh model
    root = run / "checkpoints"
    assert (root / ckpt.tag_for(3) / "universal" / "zero").is_dir()
    assert ckpt.read_meta(root / ckpt.tag_for(6))["world_size"] == 1 and (run / "DONE").is_file()
    assert (root / ckpt.tag_for(6) / "config.yaml").is_file()  # the resolved config travels with the checkpoint


def test_disk_full_during_a_save_keeps_earlier_checkpoints(tmp_path, assets, shapes):
    """The run directory on a 4 MiB tmpfs: the checkpoint of step 2 (~2.7 MB) fits, the one of step 4 does not.
    (Where mounting is not permitted, ENOSPC is injected at rank 1's trainer-state write instead.) The run stops
    with an error that says "no space left" and names the checkpoint; step 2 stays committed and `latest`."""
    with small_tmpfs(tmp_path / "disk", "4m") as mounted:
        run = tmp_path / "disk" / "run"
        cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"run.output_dir": str(run),
                                                                   "checkpoint.every_steps": 2})
        fault = {} if mounted else {"enospc_in_save": {"rank": 1, "step": 4}}
        out = launch(cfg, env={"PRETRAIN_TEST_FAULTS": json.dumps(fault)}, timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode not in (0, EXIT_PREEMPTED), text[-3000:]
        assert "no space left on device while saving checkpoint" in text, text[-5000:]
        assert str(run / "checkpoints" / ckpt.tag_for(4)) in text
        root = run / "checkpoints"
        assert (root / "latest").read_text().strip() == ckpt.tag_for(2)
        assert ckpt.is_committed(root / ckpt.tag_for(2)) and ckpt.find_resume(root) == root / ckpt.tag_for(2)
        assert not (root / ckpt.tag_for(4)).exists() or not ckpt.is_committed(root / ckpt.tag_for(4))
        assert not (run / "DONE").exists()
