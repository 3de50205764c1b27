"""Deterministic WebDataset shard writing and the `manifest.json` that describes a shard directory.

A re-run over the same input must give byte-identical tars, so every tar header field that would otherwise carry the
environment (mtime, uid/gid, user/group names, file mode) is fixed. We use webdataset's own `TarWriter` with
`encoder=False` (values are already bytes, so nothing is re-encoded), `mtime=0` and fixed names: with those it
writes plain USTAR headers whose only inputs are the member name and the bytes. Members of a sample are written in
sorted extension order by `TarWriter`, which is also deterministic.

Shards are written to `NAME.tmp<pid>` and renamed when complete (pretrain.atomic_file), so a crash never leaves a
half-written `.tar` that looks finished.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.atomic_file import AtomicFile, write_atomic
from pretrain.data.urls import MANIFEST_NAME  # the name the runtime looks for

if TYPE_CHECKING:
    from webdataset.writer import TarWriter


MANIFEST_VERSION = 1
DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # 1 GiB: large enough to stream well, small enough to spread over many workers

_TAR_BLOCK = 512
_TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this on close
# webdataset splits a member name at the first dot: the key must not contain one. We also keep keys to a portable
# character set so they survive shells, URLs and every file system.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_EXT_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


def check_key(key: str) -> str:
    """Return `key` if it is safe as a WebDataset sample key, else raise ValueError."""
    if not _KEY_RE.match(key) or len(key) > 90:  # USTAR member names are limited to 100 bytes with the extension
        raise ValueError(f"unsafe sample key {key!r}: use letters, digits, '_', '-' (and '/'), no dots, <= 90 chars")
    return key


def _member_bytes(size: int) -> int:
    """Bytes one tar member takes: a header block plus the data rounded up to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _final_tar_bytes(member_bytes: int) -> int:
    """Size of the closed tar: members + the two zero end blocks, padded to a whole record."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def sample_tar_bytes(sample: Mapping[str, Any]) -> int:
    """Bytes a sample adds to a tar (headers and padding included), to rotate shards before they pass the limit."""
    return sum(_member_bytes(len(_as_bytes(v))) for k, v in sample.items() if not k.startswith("__"))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"sample values must be bytes or str, got {type(value).__name__}")


class ShardWriter:
    """Write samples into `out_dir/{prefix}-000000.tar`, `-000001.tar`, ... rotating by sample count and bytes.

    A sample is a dict with `__key__` and one entry per extension (`"png"`, `"json"`, `"txt"`, ...) holding bytes
    or str. Use as a context manager; `shards` lists `{"url", "samples", "bytes"}` of every finished shard.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if max_shard_bytes < 2 * _TAR_RECORD:
            raise ValueError(f"max_shard_bytes must be >= {2 * _TAR_RECORD}, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: TarWriter | None = None
        self._file: AtomicFile | None = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; opens a new shard first when this one would pass the count or byte limit."""
        key = check_key(sample["__key__"])
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        for ext in sample:
            if ext != "__key__" and not _EXT_RE.match(ext):
                raise ValueError(f"bad extension {ext!r} for sample {key!r}")
        size = sample_tar_bytes(sample)
        # A sample larger than the limit still gets written, alone in its shard: dropping it silently would be worse.
        if self._writer is not None and (
            self._count >= self.samples_per_shard or _final_tar_bytes(self._bytes + size) > self.max_shard_bytes
        ):
            self._finish_shard()
        if self._writer is None:
            self._open_shard()
        assert self._writer is not None
        self._writer.write({k: _as_bytes(v) if k != "__key__" else v for k, v in sample.items()})
        self._keys.add(key)
        self._count += 1
        self._bytes += size

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; returns the list of shards written."""
        if self._writer is not None:
            self._finish_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = AtomicFile(self.out_dir / name)
        from webdataset.writer import TarWriter  # imported when a shard is written: keeps `--help` fast

        self._writer = TarWriter(self._file.file, user="pretrain", group="pretrain", mode=0o444, encoder=False, mtime=0)
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        path = self._file.commit()
        self.shards.append({"url": path.name, "samples": self._count, "bytes": path.stat().st_size})
        self._writer = None
        self._file = None

    def _abort(self) -> None:
        """On an error, drop the unfinished shard; finished ones stay (they are complete and valid)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                assert self._file is not None
                self._file.discard()
                self._writer = None


def clear_shard_dir(out_dir: str | Path, prefix: str = "shard", overwrite: bool = False) -> None:
    """Make sure a new build cannot mix with an old one in `out_dir`.

    Existing shards or a manifest are an error unless `overwrite`; then exactly those files (`{prefix}-NNNNNN.tar`,
    their `.tmp<pid>` leftovers and `manifest.json`) are removed and nothing else.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar(\.tmp\d*)?$")
    old = sorted(p for p in out_dir.iterdir() if pattern.match(p.name) or p.name == MANIFEST_NAME)
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a shard build ({old[0].name}, ...); --overwrite replaces it")
    for path in old:
        path.unlink()


def write_manifest(
    out_dir: str | Path,
    shards: Iterable[Mapping[str, Any]],
    skipped: Iterable[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out_dir/manifest.json` and return what was written.

    `shards`: `{"url": file name relative to out_dir, "samples": n, "bytes": b}`; `skipped`: `{"input": ...,
    "reason": ...}` (plus optional `detail`). Totals and skip counts by reason are derived here so they always agree
    with the lists. `extra` adds top-level keys (source, arguments, ...) but may not replace the derived ones.
    """
    shards = [dict(s) for s in shards]
    skipped = [dict(s) for s in skipped]
    for s in skipped:
        if "reason" not in s or "input" not in s:
            raise ValueError(f"a skipped entry needs 'input' and 'reason': {s}")
    manifest: dict[str, Any] = {
        "format": "webdataset",
        "version": MANIFEST_VERSION,
        "num_shards": len(shards),
        "num_samples": sum(int(s["samples"]) for s in shards),
        "num_bytes": sum(int(s["bytes"]) for s in shards),
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "shards": shards,
        "skipped": skipped,
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"manifest key {key!r} is derived and cannot be set through extra")
        manifest[key] = value
    path = Path(out_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Load `out_dir/manifest.json` (raises FileNotFoundError when the directory has none)."""
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
