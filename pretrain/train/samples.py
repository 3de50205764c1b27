"""`data.record_samples`: which samples each rank trained on, per optimizer step.

`RUN_DIR/samples/rank<R>.jsonl` holds `{"step": n, "keys": [...]}` per step, each key `{"source", "shard", "key",
"epoch"}` (the source's index in data.train, the shard URL, the sample key, the source epoch it was read in). As with
metrics.jsonl, a run resumed after a crash first drops the lines of steps past its checkpoint, so every step appears
once and a step's line is that of the run that kept it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.train.run_log import _drop_after as drop_steps_after


def samples_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "samples" / f"rank{rank}.jsonl"


class SampleRecorder:
    def __init__(self, run_dir: Path, rank: int, world: int, start_step: int) -> None:
        path = samples_path(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        drop_steps_after(path, start_step)
        if rank == 0:  # ranks of an earlier, larger world that do not write any more: their lost steps go too
            for old in path.parent.glob("rank*.jsonl"):
                if old.stem[4:].isdigit() and int(old.stem[4:]) >= world:
                    drop_steps_after(old, start_step)
        self.file = open(path, "a", buffering=1)

    def record(self, step: int, batches: list[dict]) -> None:
        keys = [k for b in batches for k in b.get("sample_keys", [])]
        self.file.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def close(self) -> None:
        self.file.close()
