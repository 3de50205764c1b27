"""Files replaced in one step: a reader sees the old file or the whole new one, and a failed write leaves no trace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pretrain.atomic_file import AtomicFile, write_atomic


def test_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "old\n")
    write_atomic(path, "new\n", durable=True, file_mode=0o755)
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    write_atomic(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes" and sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "COMMITTED"
    write_atomic(path, "committed\n")
    with pytest.raises(RuntimeError, match="died half-way"), AtomicFile(path, "w", durable=True) as f:
        f.write("half")
        f.flush()
        assert path.read_text() == "committed\n"  # nothing shows under the name while it is written
        raise RuntimeError("died half-way")
    assert path.read_text() == "committed\n" and sorted(os.listdir(tmp_path)) == ["COMMITTED"]
    out = AtomicFile(tmp_path / "shard.tar")
    out.file.write(b"tar")
    out.discard()
    assert sorted(os.listdir(tmp_path)) == ["COMMITTED"]
