"""Elastic exact resume in real runs: a 2-rank x 2-worker run lost the steps after its mid-epoch checkpoint; resumed on
1 rank x 1 worker and on 3 ranks x 1 worker, each run goes past the end of the epoch. From `samples/` (the keys
each rank trained on per step): every sample of the epoch, of both weighted sources, packed, trained exactly once
across the two parts, and every step recorded once despite the lost steps."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers.runs import launch, write_config

from pretrain.data.stream import ShardReader
from pretrain.data.urls import expand_urls
from pretrain.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

CHECKPOINT = 6  # the first run's checkpoint to resume from; it ran on to step 8


def _records(run: Path) -> dict[int, list[dict]]:
    """rank -> its lines of samples/rank<R>.jsonl."""
    out = {}
    for path in sorted((run / "samples").glob("rank*.jsonl")):
        out[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def _epoch(records: dict[int, list[dict]], epoch: int) -> Counter:
    return Counter((k["source"], k["shard"], k["key"]) for lines in records.values() for line in lines
                   for k in line["keys"] if k["epoch"] == epoch)


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, assets, shapes):
    """The first part: 2 ranks x 2 workers to step 8 with checkpoints at 6 and 8; then step 8's checkpoint is
    removed, as if the run had died before saving it: steps 7-8 are recorded but not in the checkpoint."""
    root = tmp_path_factory.mktemp("elastic")
    urls = expand_urls(shapes["train"]["urls"])
    cfg = write_config(root / "c.yaml", assets, shapes, **{
        "data.train": [{"urls": urls[:2], "weight": 2.0}, {"urls": urls[2:3], "weight": 1.0}],
        "data.packing": True, "data.record_samples": True, "data.num_workers": 2, "data.shuffle_buffer": 4,
        "train.max_steps": 200, "checkpoint.every_steps": CHECKPOINT})
    out = launch(cfg, overrides=[f"train.stop_at_step={CHECKPOINT + 2}"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    ckpts = root / "run" / "checkpoints"
    shutil.rmtree(ckpts / ckpt.tag_for(CHECKPOINT + 2))
    (ckpts / "latest").write_text(ckpt.tag_for(CHECKPOINT))
    records = _records(root / "run")
    assert [line["step"] for line in records[1]] == list(range(1, CHECKPOINT + 3))
    return root, [urls[:2], urls[2:3]]


@pytest.mark.parametrize("nproc, steps", [(1, 14), (3, 8)])
def test_resume_on_other_ranks_and_workers_trains_the_epoch_once(tmp_path, crashed_run, nproc, steps):
    """Resumed with 1 worker per rank and twice the micro-batch size (both changes are part of the layout)."""
    root, sources = crashed_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((root / "c.yaml").read_text().replace(str(root / "run"), str(run)))
    stop = CHECKPOINT + steps
    out = launch(cfg, nproc=nproc, timeout=600, overrides=["data.num_workers=1", "train.micro_batch_size=8",
                                                           f"train.stop_at_step={stop}"])
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert "the rest of the interrupted epoch is split over the new slots" in text
    records = _records(run)
    assert sorted(records) == list(range(max(2, nproc)))
    for rank, lines in records.items():
        steps_seen = [line["step"] for line in lines]
        first, last = 1 if rank < 2 else CHECKPOINT + 1, stop if rank < nproc else CHECKPOINT
        want = list(range(first, last + 1))
        assert steps_seen == want, (rank, steps_seen)  # each step once: the lost steps 7-8 were dropped
    reader = ShardReader()
    every = Counter((i, url, key) for i, urls in enumerate(sources) for url in urls
                    for key, _ in reader._local_index(url))
    first = _epoch(records, 0)
    assert first == every  # both sources' whole epoch, each sample exactly once
    after = _epoch({r: [ln for ln in lines if ln["step"] > CHECKPOINT] for r, lines in records.items()}, 0)
    assert 0 < sum(after.values()) < sum(every.values())  # the epoch really was split between the two parts
    assert max(_epoch(records, 1).values()) == 1  # and the next epoch has begun, no sample twice
    head = [line for lines in records.values() for line in lines if line["step"] <= CHECKPOINT]
    assert sum(len(line["keys"]) for line in head) > 4 * len(head)  # 4 rows a rank-step: rows held several
