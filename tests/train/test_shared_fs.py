"""Shared file systems and rank-0-only work on 2 gloo ranks (helpers/shared_fs_worker.py): rank 0's choice of the
checkpoint to resume wins over another rank's view, a bad path fails on every rank, rank-0 work longer than the
collective timeout is waited for, its failure reaches every rank, and a rank that sees another run directory stops
every rank with a message naming it. Then the same through `pretrain launch`: a node-local run directory stops
the run at start-up, and a commit slower than deepspeed.timeout_minutes does not kill it."""

from __future__ import annotations

import json

import pytest
from helpers.faults import fault_env
from helpers.model import torchrun
from helpers.runs import ROOT, launch, write_config

from pretrain.train import checkpoint as ckpt

WORKER = ROOT / "tests" / "helpers" / "shared_fs_worker.py"


def _committed(root, step: int) -> None:
    tag = root / ckpt.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "shard.pt").write_bytes(b"x" * step)
    ckpt.commit(root, tag.name, {"step": step, "world_size": 2, "zero_stage": 3})


@pytest.mark.slow
def test_rank0_decides_and_its_work_outlasts_the_collective_timeout(tmp_path):
    roots = [tmp_path / "node0" / "checkpoints", tmp_path / "node1" / "checkpoints"]
    _committed(roots[0], 4)
    _committed(roots[1], 2)  # another node whose (stale) view shows an older checkpoint only
    out = torchrun(WORKER, [str(tmp_path), str(roots[0]), str(roots[1])], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["own_view"].endswith("step_00000002")  # the case occurred: rank 1 alone would pick another one
    assert r0["resume"] == r1["resume"] == [str(roots[0] / "step_00000004"), 4]
    for r in (r0, r1):
        assert r["bad_path"].startswith("FileNotFoundError") and "nope: no such checkpoint" in r["bad_path"]
        assert r["slow"] == "converted" and r["after_slow"] == 3.0
    assert r1["slow_waited_s"] > 2.5 * 2.0 - 1  # rank 1 really waited past the 2 s collective timeout
    assert r0["failed"] == "ValueError: disk on fire"
    assert r1["failed"] == "RuntimeError: rank 0 failed: ValueError: disk on fire"
    assert r0["same_dir"] is None and r1["same_dir"] is None
    for r in (r0, r1):
        assert r["other_dir"].startswith("SharedRunDirError") and "rank 1 on" in r["other_dir"]
        assert "found nothing at" in r["other_dir"] and "elsewhere1" in r["other_dir"]
    assert "timed out" in (r1["barrier_control"] or "").lower()  # the control: a barrier there times out


@pytest.mark.slow
def test_a_rank_with_another_run_dir_stops_the_run_at_start_up(tmp_path, assets, shapes):
    cfg = write_config(tmp_path / "c.yaml", assets, shapes)
    local = tmp_path / "node-local"
    fault = {"run_dir": {"rank": 1, "path": str(local)}}
    out = launch(cfg, env=fault_env(fault), timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode not in (0, 75), text
    assert "run.output_dir is not one directory shared by all ranks" in text, text[-3000:]
    assert "rank 1 on" in text and str(local / ".run_token") in text
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_commit_slower_than_the_collective_timeout_does_not_kill_the_run(tmp_path, assets, shapes):
    # A 12 s collective timeout, and rank 0 spends 25 s in the commit while rank 1 waits for it.
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"train.max_steps": 2, "deepspeed.timeout_minutes": 0.2})
    out = launch(cfg, env=fault_env({"commit_sleep": 25}), timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert ckpt.is_committed(tag) and (tmp_path / "run" / "DONE").is_file()
    # COMMITTED lists what each rank reported writing, with the sizes on disk.
    marker = ckpt.read_meta(tag)
    mine = marker["written_by"]["1"]
    assert "trainer_rank00001.pt" in mine and any(n.startswith("zero_pp_rank_1_") for n in mine), marker
    assert not any("rank_0_" in n or n == "trainer_rank00000.pt" for n in mine)
    assert "trainer_rank00000.pt" in marker["written_by"]["0"]
    for name, size in marker["files"].items():
        assert (tag / name).stat().st_size == size
    assert set(marker["written_by"]["0"]) | set(mine) <= set(marker["files"])
