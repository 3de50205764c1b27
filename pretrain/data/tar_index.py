"""The tar format as the loader reads it: webdataset's grouping of members into samples by key, members read from a
stream, and the check that a tar read by its headers alone was not cut short."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# webdataset's key rule: the key is the path up to the first dot of the basename.
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class Member:
    name: str
    offset: int
    size: int


def group_members(members: Iterator[tuple[str, object]]) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """Consecutive members sharing a key form a sample (webdataset's group_by_keys)."""
    key, group = None, []
    for name, payload in members:
        m = KEY_EXT.match(name)
        if not m:
            continue
        k, ext = m.group(1), m.group(2)
        if key is not None and k != key:
            yield key, group
            group = []
        key = k
        group.append((ext.lower(), payload))
    if key is not None:
        yield key, group


def stream_members(tf: tarfile.TarFile, start: int) -> Iterator[tuple[str, bytes | None]]:
    """Members of a tar read as a stream, with their data read at once (a stream cannot seek back to it later);
    members of samples before `start` are passed over unread: tarfile skips their bytes without keeping them."""
    key, index = None, -1
    for info in tf:
        m = KEY_EXT.match(info.name) if info.isfile() else None
        if not m:
            continue
        if m.group(1) != key:
            key, index = m.group(1), index + 1
        yield info.name, tf.extractfile(info).read() if index >= start else None


def file_size(path: str) -> int:
    return Path(path).stat().st_size


def truncation(path: str, members: list[Member]) -> str | None:
    """Reading headers alone seeks past a cut: check that the data fits the file and the end-of-archive block
    follows the last member, as every complete tar has."""
    size = file_size(path)
    if not members:
        return None if size >= 1024 else "truncated: no end-of-archive marker"
    last = members[-1]
    end = last.offset + -(-last.size // 512) * 512
    if last.offset + last.size > size:
        return f"truncated: member {last.name} ends past the end of the file"
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(512)
    if len(block) < 512 or block.strip(b"\0"):
        return "truncated: no end-of-archive marker after the last member"
    return None
