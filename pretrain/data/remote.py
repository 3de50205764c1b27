"""Shards read as streams over http(s) or from a command (`pipe:`), with a stall timeout and bounded retries.

A read that gets no byte for `stall_s` seconds fails: a server that accepts and never answers, a command that hangs
on a stalled file system. A failed attempt (a stall, a refused or reset connection, a body cut short, HTTP 5xx, 408
or 429, a command that exits non-zero) is retried at most `retries` times, after 1, 2, 4, ... x `backoff_s` seconds,
from the byte reached: HTTP asks for the rest with a Range request (a server that ignores it sends the whole body
again and the bytes already delivered are passed over), a command is run again and its first bytes passed over.
Then the stream fails with an OSError that names the URL, the attempts and the last error, and the loader counts
the shard lost. Any other HTTP 4xx (404, 403) is not retried: asking again gives the same answer.

http(s) is read by Python's urllib (no curl needed, the system's proxy variables honoured); other schemes (gs://,
s3://) go through webdataset's opener as before.
"""

from __future__ import annotations

import http.client
import io
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

_RETRIED_HTTP = (408, 429)


@dataclass(frozen=True)
class StreamPolicy:
    stall_s: float = 60.0  # no byte for this long: the attempt failed
    retries: int = 3  # attempts after the first
    backoff_s: float = 1.0  # pause before the first retry, doubled each time


class _Final(OSError):
    """An attempt that failed in a way a retry would not change (HTTP 404, 403, ...)."""


class _Http:
    def __init__(self, url: str, offset: int, stall_s: float) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            self.response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=stall_s)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code >= 500 or err.code in _RETRIED_HTTP:
                raise OSError(f"HTTP {err.code} {err.reason}") from None
            raise _Final(f"HTTP {err.code} {err.reason}") from None
        self.skip = offset if offset and self.response.status != 206 else 0  # Range ignored: the whole body again

    def read(self, n: int) -> bytes:
        while self.skip:
            passed = self.response.read(min(self.skip, 1 << 20))
            if not passed:
                raise OSError("the body ended before the position reached earlier")
            self.skip -= len(passed)
        data = self.response.read(n)
        if not data and self.response.length:  # urllib returns b"" when the body ends before its length
            raise OSError(f"the connection closed {self.response.length} bytes before the end of the body")
        return data

    def close(self) -> None:
        self.response.close()


class _Command:
    """A `pipe:` command's standard output, read with a stall timeout; its exit status is checked at the end."""

    def __init__(self, command: str, offset: int, stall_s: float) -> None:
        self.command, self.stall_s, self.skip = command, stall_s, offset
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def _read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.stall_s)
        if not ready:
            raise TimeoutError(f"no byte from the command for {self.stall_s:g} s")
        data = os.read(self.fd, n)
        if not data:
            code = self.proc.wait()
            if code != 0:
                raise OSError(f"the command exited with status {code}")
        return data

    def read(self, n: int) -> bytes:
        while self.skip:
            passed = self._read(min(self.skip, 1 << 20))
            if not passed:
                raise OSError("the command's output ended before the position reached earlier")
            self.skip -= len(passed)
        return self._read(n)

    def close(self) -> None:
        if self.proc.poll() is None:  # stopped early or stalled: the command and its children go
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdout.close()
        self.proc.wait()


class RetryingStream(io.RawIOBase):
    """A read-only file over `url` (`pipe:CMD` or http(s)) that retries failed attempts from the byte reached.
    `read(n)` returns n bytes, fewer only at the end, like a file."""

    def __init__(self, url: str, policy: StreamPolicy) -> None:
        super().__init__()
        self.url, self.policy = url, policy
        self.pos, self.failures, self.started = 0, 0, time.monotonic()
        self.source: _Http | _Command | None = None
        self.ended = False

    def _open(self) -> _Http | _Command:
        if self.url.startswith("pipe:"):
            return _Command(self.url[len("pipe:"):], self.pos, self.policy.stall_s)
        return _Http(self.url, self.pos, self.policy.stall_s)

    def _attempt_read(self, n: int) -> bytes:
        while True:
            try:
                if self.source is None:
                    self.source = self._open()
                return self.source.read(n)
            except (OSError, http.client.HTTPException) as err:
                self._drop_source()
                self.failures += 1
                if isinstance(err, _Final) or self.failures > self.policy.retries:
                    raise OSError(f"{self.url}: gave up after {self.failures} attempt(s) in "
                                  f"{time.monotonic() - self.started:.1f} s: {type(err).__name__}: {err}") from err
                time.sleep(self.policy.backoff_s * 2 ** (self.failures - 1))

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        chunks, want = [], n
        while want and not self.ended:
            data = self._attempt_read(want)
            if not data:
                self.ended = True
                break
            chunks.append(data)
            self.pos += len(data)
            want -= len(data)
        return b"".join(chunks)

    def readable(self) -> bool:
        return True

    def _drop_source(self) -> None:
        if self.source is not None:
            source, self.source = self.source, None
            try:
                source.close()
            except OSError:
                pass

    def close(self) -> None:
        self._drop_source()
        super().close()


def open_stream(url: str, policy: StreamPolicy):
    """A read-only binary stream of a remote shard: ours for `pipe:` and http(s), webdataset's for the rest."""
    if url.startswith(("pipe:", "http://", "https://")):
        return RetryingStream(url, policy)
    import webdataset as wds

    return wds.gopen(url, "rb")
