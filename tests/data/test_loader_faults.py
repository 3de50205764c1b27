"""File-system and network faults are data, not crashes: a shard that cannot be read is lost and counted by its
manifest's sample count, a resume whose saved shuffle buffer held samples of a shard that vanished since goes on
and trains every other sample of the epoch once, and http(s) / `pipe:` streams give up after a bounded time (a real
local HTTP server: one that accepts and never answers, one that answers 500, one that fails once, one that cuts
its body once)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain.data.errors import UNREADABLE_SHARD
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.remote import StreamPolicy
from pretrain.data.stream import DataSourceError, ShardReader, SourceStream
from pretrain.data.urls import expand_urls
from pretrain.train.trainer import Trainer


@pytest.fixture()
def shard_dir(shapes, tmp_path) -> Path:
    """A copy of the 8 train shards (64 samples each) and their manifest.json, to break."""
    src = Path(expand_urls(shapes["train"]["urls"])[0]).parent
    out = tmp_path / "train"
    shutil.copytree(src, out)
    return out


def _loader(processor, shard_dir, states=None, **spec) -> ResumableLoader:
    kw = dict(sources=[expand_urls(str(shard_dir))], weights=[1.0], rows_per_batch=8, max_length=64,
              shuffle=False, shuffle_buffer=8, single_pass=True)
    return ResumableLoader(LoaderSpec(**{**kw, **spec}), processor, states)


def _keys(batches) -> list[tuple[str, str]]:
    return [(Path(k["shard"]).name, k["key"]) for b in batches for k in b["sample_keys"]]


def test_unreadable_shards_are_lost_by_their_manifest_count(processor, shard_dir):
    """Three of the 8 shards fail, each with a real OSError: one deleted, one replaced by a directory
    (IsADirectoryError), one a path to /proc/self/mem, whose first page is unmapped (EIO on read). One epoch: the 5
    good shards' 320 samples are trained, and each bad shard counts its 64 listed samples as lost (not 1), so the
    loss shows against data.max_bad_fraction as what it is: 192 of 512."""
    shards = expand_urls(str(shard_dir))
    Path(shards[1]).unlink()
    Path(shards[3]).unlink()
    Path(shards[3]).mkdir()
    Path(shards[6]).unlink()
    Path(shards[6]).symlink_to("/proc/self/mem")
    loader = _loader(processor, shard_dir)
    keys = _keys(loader)
    assert len(keys) == len(set(keys)) == 5 * 64
    assert {name for name, _ in keys} == {Path(shards[i]).name for i in (0, 2, 4, 5, 7)}
    stats = loader.stats()
    assert stats["ok"] == [320]
    assert stats["skipped"][0] == {UNREADABLE_SHARD: 192}
    # The trainer's check over these counts (as reduced over ranks) stops the run, naming the reason.
    data = SimpleNamespace(max_bad_fraction=0.05, bad_min_samples=200, train=[SimpleNamespace(urls=str(shard_dir))])
    with pytest.raises(DataSourceError, match=r"192 of 512 samples skipped .*unreadable_shard"):
        Trainer._check_bad_fraction(SimpleNamespace(cfg=SimpleNamespace(data=data)), stats["ok"],
                                    [sum(d.values()) for d in stats["skipped"]], stats["skipped"])


def test_resume_after_a_buffered_shard_vanished_trains_the_rest_once(processor, shard_dir):
    """A 1-rank loader with a 64-sample shuffle buffer saves its position after 20 batches; the shard most of whose
    samples sat in that buffer is deleted; the resumed loader goes on (no crash) to the end of the epoch: every
    sample trained before the save or after it is trained once, and every one of the 512 is either trained or
    counted lost (the vanished shard's untrained samples, exactly)."""
    kw = dict(shuffle=True, shuffle_buffer=64, rows_per_batch=4, seed=3)
    every = {(Path(u).name, raw.key) for u in expand_urls(str(shard_dir)) for raw in ShardReader().iterate(u)}
    first = _loader(processor, shard_dir, **kw)
    it = iter(first)
    before = _keys(next(it) for _ in range(20))
    state = json.loads(json.dumps(first.state_dict()))
    buffered = Counter(Path(url).name for _, url, _ in state["slots"]["0"]["buffer"])
    victim, n_buffered = buffered.most_common(1)[0]
    assert n_buffered > 1
    (shard_dir / victim).unlink()
    resumed = _loader(processor, shard_dir, states={0: state}, **kw)
    after = _keys(resumed)
    trained = before + after
    assert len(trained) == len(set(trained))  # nothing twice
    assert set(trained) <= every
    untrained = every - set(trained)
    assert untrained and {name for name, _ in untrained} == {victim}  # only the vanished shard's, ...
    assert resumed.stats()["skipped"][0] == {UNREADABLE_SHARD: len(untrained)}  # ... each counted lost


class _Shards(BaseHTTPRequestHandler):
    """GET /good.tar, /flaky.tar (500 once, then the shard), /cut.tar (half the body once, then the rest on a Range
    request), /error.tar (always 500), /stall.tar (accepts, never answers)."""

    body: bytes = b""
    hits: Counter = Counter()
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        name = self.path.strip("/")
        self.hits[name] += 1
        if name == "stall.tar":
            self.release.wait(30)
            return
        if name == "error.tar" or (name == "flaky.tar" and self.hits[name] == 1):
            self.send_error(500, "broken on purpose")
            return
        start = int(self.headers.get("Range", "bytes=0-")[len("bytes="):].rstrip("-"))
        body = self.body[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name == "cut.tar" and self.hits[name] == 1:
            self.wfile.write(body[: len(body) // 2])  # then the connection closes: a body cut short
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server(shapes, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    _Shards.body = Path(expand_urls(shapes["train"]["urls"])[0]).read_bytes()
    _Shards.hits = Counter()
    _Shards.release = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Shards)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Shards.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_http_and_pipe_streams_retry_a_bounded_number_of_times_then_count_the_shard_lost(server):
    """One pass over 6 streamed shards, stall timeout 0.5 s and 2 retries: the good, the flaky (500 once) and the
    cut (half a body once, the rest fetched with a Range request) shards give all their samples; the one that always
    answers 500 is asked exactly 3 times, the one that never answers and a `pipe:` command that hangs each fail
    after 3 stalls; each lost shard counts 64 samples (the size of the shards read whole), and the whole pass ends
    in bounded time."""
    policy = StreamPolicy(stall_s=0.5, retries=2, backoff_s=0.05)
    urls = [f"{server}/good.tar", f"{server}/flaky.tar", f"{server}/cut.tar", f"{server}/error.tar",
            f"{server}/stall.tar", "pipe:sleep 30"]
    stream = SourceStream(urls, 0, 1, 0, 0, False, ShardReader(policy))
    t0 = time.monotonic()
    got = []
    while stream.state.epoch == 0:
        raw = stream.next()
        if raw.epoch == 0:
            got.append((raw.url, raw.key))
        else:
            break
    elapsed = time.monotonic() - t0
    assert Counter(url.rsplit("/", 1)[-1] for url, _ in got) == {"good.tar": 64, "flaky.tar": 64, "cut.tar": 64}
    assert len(set(got)) == 3 * 64
    assert stream.state.lost == {UNREADABLE_SHARD: 3 * 64}
    assert _Shards.hits["error.tar"] == 3 and _Shards.hits["stall.tar"] == 3
    assert _Shards.hits["flaky.tar"] == 2 and _Shards.hits["cut.tar"] == 2
    assert 2 * 3 * 0.5 <= elapsed < 30, elapsed  # the stalls were waited out, and nothing waited for ever
