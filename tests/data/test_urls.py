"""pretrain.data.urls: the one URL expansion (brace patterns, globs, directories, remote URLs) every command uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.data.urls import MANIFEST_NAME, expand_urls, is_remote, missing_shards


def _tars(directory: Path, names: list[str]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return [str(directory / n) for n in names]


def test_brace_pattern_and_quoted_glob(tmp_path: Path) -> None:
    paths = _tars(tmp_path, ["shard-000002.tar", "shard-000000.tar", "shard-000001.tar", "notes.txt"])
    assert expand_urls(str(tmp_path / "shard-{000000..000001}.tar")) == [paths[1], paths[2]]
    assert expand_urls(str(tmp_path / "*.tar")) == [paths[1], paths[2], paths[0]]  # sorted, only the matches
    assert expand_urls([str(tmp_path / "shard-00000[02].tar"), paths[2]]) == [paths[1], paths[0], paths[2]]


def test_directory_means_its_manifest_first_else_its_tars(tmp_path: Path) -> None:
    listed = tmp_path / "listed"
    a, b, _ = _tars(listed, ["b.tar", "a.tar", "stray.tar"])
    manifest = {"shards": [{"url": "b.tar", "samples": 1, "bytes": 0}, {"url": "a.tar", "samples": 1, "bytes": 0}]}
    (listed / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert expand_urls(str(listed)) == [a, b]  # the manifest's order, and the tar it does not list is left out
    plain = tmp_path / "plain"
    c, d = _tars(plain, ["d.tar", "c.tar"])
    assert expand_urls(str(plain) + "/") == [d, c]


def test_remote_urls_pass_through_after_brace_expansion() -> None:
    urls = expand_urls(["pipe:curl -s http://host/s-{0..1}.tar", "https://host/a.tar", "s3://bucket/x.tar"])
    assert urls == ["pipe:curl -s http://host/s-0.tar", "pipe:curl -s http://host/s-1.tar",
                    "https://host/a.tar", "s3://bucket/x.tar"]
    assert all(is_remote(u) for u in urls) and not is_remote("data/a.tar")
    assert missing_shards(urls) == []


def test_patterns_that_name_nothing_are_errors_naming_them(tmp_path: Path) -> None:
    _tars(tmp_path / "empty", [])
    cases = {
        str(tmp_path / "nomatch-*.tar"): "matches no file",
        str(tmp_path / "gone"): "no such shard directory",
        str(tmp_path / "gone") + "/": "no such shard directory",
        str(tmp_path / "empty"): r"no manifest.json and no \*.tar",
    }
    for pattern, reason in cases.items():
        with pytest.raises(FileNotFoundError, match=reason) as err:
            expand_urls(pattern)
        assert pattern in str(err.value)


def test_a_missing_shard_file_is_kept_for_the_caller_to_report(tmp_path: Path) -> None:
    present = _tars(tmp_path, ["a.tar", "no-suffix", "odd[1].tar"])  # existing files are taken as named
    urls = expand_urls([*present, str(tmp_path / "b.tar")])
    assert urls == [*present, str(tmp_path / "b.tar")]
    assert missing_shards(urls) == [str(tmp_path / "b.tar")]


def test_an_unreadable_manifest_is_an_error_naming_it(tmp_path: Path) -> None:
    _tars(tmp_path, ["a.tar"])
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(FileNotFoundError, match="manifest.json cannot be read"):
        expand_urls(str(tmp_path))
