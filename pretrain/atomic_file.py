"""Files that readers see whole or not at all: written under a temporary sibling name, then renamed into place.

A rename within a directory is atomic, so a reader (another rank, a chained job, a user's tool) finds the previous
file or the complete new one, never a torn one. The temporary name carries the writer's pid, so two processes
writing the same file do not write into each other's; a failed write removes its temporary file. `durable` also
flushes the data to the disk before the rename and the directory entry after it, for what must survive a crash of
the machine (checkpoint markers and trainer states), not only of the process.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `NAME.tmp<pid>` beside it."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename, a new file) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """An open file that appears under `path` only on `commit()`; `discard()` (or an error inside a `with` block)
    drops it. `mode`: "w" for text, "wb" for bytes. `file_mode`: the permission bits the file gets."""

    def __init__(self, path: str | Path, mode: str = "wb", *, durable: bool = False,
                 file_mode: int | None = None, encoding: str | None = None) -> None:
        self.path, self.durable, self.file_mode = Path(path), durable, file_mode
        self.tmp = temporary_name(self.path)
        self.file: IO[Any] = open(self.tmp, mode, encoding=encoding if "b" not in mode else None)

    def commit(self) -> Path:
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            if self.file_mode is not None:
                self.tmp.chmod(self.file_mode)
            self.tmp.replace(self.path)
        except BaseException:
            self.discard()
            raise
        if self.durable:
            fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_atomic(path: str | Path, data: str | bytes, *, durable: bool = False, file_mode: int | None = None) -> Path:
    """Replace `path` with `data` (text is written as UTF-8) in one step for any reader."""
    with AtomicFile(path, "wb" if isinstance(data, bytes) else "w", durable=durable, file_mode=file_mode,
                    encoding="utf-8") as f:
        f.write(data)
    return Path(path)
