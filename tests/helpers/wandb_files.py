"""W&B's offline run files read back: the `.wandb` transaction log (LevelDB's log format under a `:W&B` header: 32 KiB
blocks of checksummed chunks) holding wandb's own protobuf records, parsed with wandb's own message classes."""

from __future__ import annotations

import json
from pathlib import Path

_HEADER = 7  # b":W&B", a 2-byte magic, a version byte
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    out, pos, pending = [], _HEADER, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    """The `.wandb` files of every offline run segment under the run directory, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def history(path: Path) -> dict[int, dict]:
    """{step: {key: value}} of a run segment's logged history (the `_`-prefixed bookkeeping keys left out)."""
    rows: dict[int, dict] = {}
    for r in records(path):
        if r.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        step = r.history.step.num if r.history.HasField("step") else items.get("_step")
        rows.setdefault(int(step), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def run_ids(path: Path) -> set[str]:
    return {r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run"}


def config(path: Path) -> dict:
    """The run's config as the records hold it ({key: value}; wandb wraps each value as {"value": ...})."""
    out: dict = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for i in items:
            out[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
