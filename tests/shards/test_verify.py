"""`pretrain shards verify`: every sample once through the training data path, skips counted by reason, the JSON
summary as the last line, exit 0 whenever the input could be read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.runs import write_config
from helpers.shards import bad_images, image_bytes, write_tar

from pretrain.cli import main
from pretrain.data.urls import expand_urls

CAPTION = json.dumps({"caption": "two blue squares on the left."}).encode()


@pytest.fixture(scope="module")
def config(tmp_path_factory, assets, shapes):
    return write_config(tmp_path_factory.mktemp("verify") / "config.yaml", assets, shapes)


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    """One sample of every bad kind, 3 good ones, and a conversation too long for max_length=64 (text cut)."""
    jpeg = image_bytes("JPEG", (48, 40))
    bad = bad_images()
    long_chat = {"conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                   {"from": "gpt", "value": "a very long answer " * 40}]}
    samples = [
        ("good0", {"jpg": jpeg, "json": CAPTION}),
        ("trunc", {"jpg": bad["truncated.jpg"], "json": CAPTION}),
        ("corrupt", {"jpg": bad["corrupt.jpg"], "json": CAPTION}),
        ("bomb", {"png": bad["bomb.png"], "json": CAPTION}),
        ("vector", {"svg": bad["vector.svg"], "json": CAPTION}),
        ("brokenjson", {"jpg": jpeg, "json": b'{"caption": '}),
        ("latin1", {"jpg": jpeg, "txt": "caf\xe9".encode("latin-1")}),
        ("notext", {"jpg": jpeg}),
        ("noimage", {"json": CAPTION}),
        ("blank", {"jpg": jpeg, "json": json.dumps({"caption": "  "}).encode()}),
        ("good1", {"jpg": jpeg, "txt": b"one red circle at the top."}),
        ("longchat", {"jpg": jpeg, "json": json.dumps(long_chat).encode()}),
        ("good2", {"png": image_bytes("PNG", (30, 30), "RGBA"), "json": CAPTION}),
    ]
    return write_tar(tmp_path_factory.mktemp("bad") / "bad-000000.tar", samples)


def _verify(capsys, *args) -> tuple[int, list[str], str]:
    code = main(["shards", "verify", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def test_good_shards_all_ok(capsys, config, shapes):
    urls = expand_urls(shapes["train"]["urls"])[:2]
    code, lines, _ = _verify(capsys, *urls, "--config", config)
    assert code == 0
    assert json.loads(lines[-1]) == {"ok": 128, "skipped": {}}


def test_quoted_glob_names_the_shards(capsys, config, shapes):
    val_dir = Path(expand_urls(shapes["val"]["urls"])[0]).parent
    code, lines, _ = _verify(capsys, f"{val_dir}/*.tar", "--config", config)
    assert code == 0 and json.loads(lines[-1]) == {"ok": 64, "skipped": {}}
    code, _, err = _verify(capsys, f"{val_dir}/nomatch-*.tar", "--config", config)
    assert code == 2 and f"{val_dir}/nomatch-*.tar: the pattern matches no file" in err


def test_bad_samples_counted_by_reason(capsys, config, bad_shard):
    code, lines, _ = _verify(capsys, bad_shard, "--config", config)
    assert code == 0  # the bad fraction is far above data.max_bad_fraction: verify reports, it never stops
    assert json.loads(lines[-1]) == {"ok": 4, "skipped": {
        "truncated_image": 1, "corrupt_image": 1, "decompression_bomb": 1, "unsupported_image_format": 1,
        "bad_json": 1, "bad_utf8": 1, "missing_text": 1, "missing_image": 1, "empty_text": 1}}
    assert "1 with text cut to data.max_length=64" in lines[-2]


@pytest.mark.slow
def test_truncated_and_piped_shards_in_parallel(capsys, config, shapes, bad_shard, tmp_path):
    """A cut tar counts its lost tail as one truncated_tar and keeps what came before; `pipe:` shards read like
    files; 2 worker processes give the same counts as 1."""
    good = expand_urls(shapes["train"]["urls"])
    data = open(good[0], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    urls = [f"pipe:cat {good[1]}", str(cut), str(bad_shard), good[2]]
    serial = _verify(capsys, *urls, "--config", config)
    parallel = _verify(capsys, *urls, "--config", config, "--workers", "2")
    result = json.loads(parallel[1][-1])
    assert serial[0] == parallel[0] == 0
    assert json.loads(serial[1][-1]) == result
    assert result["skipped"]["truncated_tar"] == 1
    assert 64 + 64 + 4 + 20 < result["ok"] < 64 + 64 + 4 + 32  # about half of the cut shard survived
    assert "cut.tar" in parallel[2]  # the cut shard is named


def test_unreadable_input_is_an_error(capsys, config, tmp_path, shapes):
    code, _, err = _verify(capsys, tmp_path / "missing-{000..002}.tar", "--config", config)
    assert code == 2 and "no such shard" in err
    code, _, err = _verify(capsys, expand_urls(shapes["val"]["urls"])[0], "--config", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in err
    # The syntax of every other command: key=value after the URLs, or after the flags.
    code, _, err = _verify(capsys, expand_urls(shapes["val"]["urls"])[0], "data.nope=1", "--config", config)
    assert code == 2 and "data.nope: unknown key" in err and "no such shard" not in err
    code, _, err = _verify(capsys, expand_urls(shapes["val"]["urls"])[0], "--config", config, "data.nope=1")
    assert code == 2 and "data.nope: unknown key" in err


def test_documents_counted_by_images(capsys, config, tmp_path):
    """Interleaved documents through the training path: samples counted by the images they give the tower."""
    png = image_bytes("PNG", (30, 30))

    def doc(texts: list, images: list, **stored: bytes) -> dict[str, bytes]:
        return {"json": json.dumps({"texts": texts, "images": images}).encode(), **stored}

    samples = [
        ("two", doc(["A.", None, "B.", None], [None, "a", None, "b"], **{"0.png": png, "1.png": png})),
        ("one", doc([None, "Under it."], ["a", None], **{"0.png": png})),
        ("none", doc(["Text only."], [None])),
        ("lost", doc(["A.", None, "B.", None], [None, "a", None, "b"], **{"0.png": png})),
        ("cap", {"png": png, "json": CAPTION}),
    ]
    shard = write_tar(tmp_path / "docs-000000.tar", samples)
    code, lines, _ = _verify(capsys, shard, "--config", config)
    assert code == 0 and json.loads(lines[-1]) == {"ok": 4, "skipped": {"missing_image": 1}}
    assert "ok samples by images (or tiles and frames) per sample: 0: 1, 1: 2, 2: 1" in lines
    assert "ok samples by kind: image: 1, interleaved: 3" in lines
