"""ShardWriter, manifests and `shards inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from helpers.shards import image_bytes, write

from pretrain.cli import main
from pretrain.shards.inspection import format_report, inspect_shards, with_manifest_entries
from pretrain.shards.synthetic import write_synthetic
from pretrain.shards.writer import ShardWriter, clear_shard_dir, read_manifest, write_manifest


def _samples(n: int, image_size: int = 100) -> list[dict]:
    return [
        {"__key__": f"s{i:04d}", "jpg": image_bytes("JPEG", (image_size, image_size), seed=i), "txt": f"caption {i}"}
        for i in range(n)
    ]


def _write(out: Path, samples: list[dict], **kwargs) -> list[dict]:
    with ShardWriter(out, **kwargs) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.shards


def test_deterministic_and_readable_by_webdataset(tmp_path: Path) -> None:
    samples = _samples(7)
    shards = _write(tmp_path / "a", samples, samples_per_shard=3)
    _write(tmp_path / "b", samples, samples_per_shard=3)
    assert [s["samples"] for s in shards] == [3, 3, 1]
    for s in shards:
        data = (tmp_path / "a" / s["url"]).read_bytes()
        assert data == (tmp_path / "b" / s["url"]).read_bytes()
        assert s["bytes"] == len(data)
    urls = [str(tmp_path / "a" / s["url"]) for s in shards]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    assert [r["jpg"] for r in read] == [s["jpg"] for s in samples]
    assert read[2]["txt"] == b"caption 2"
    assert not list((tmp_path / "a").glob("*.tmp*"))


def test_rotation_by_bytes_keeps_every_shard_under_the_limit(tmp_path: Path) -> None:
    samples = _samples(12, image_size=120)
    limit = 40_000
    shards = _write(tmp_path, samples, samples_per_shard=1000, max_shard_bytes=limit)
    assert len(shards) > 2 and sum(s["samples"] for s in shards) == 12
    assert all(s["bytes"] <= limit for s in shards)
    # A sample larger than the limit is written alone rather than dropped.
    big = {"__key__": "big", "bin": b"x" * 50_000}
    shards = _write(tmp_path / "big", [*samples[:2], big, samples[2]], max_shard_bytes=limit)
    assert [s["samples"] for s in shards] == [2, 1, 1]


@pytest.mark.parametrize("key", ["a.b", "has space", "", "x" * 91, "../up"])
def test_unsafe_keys_are_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="unsafe sample key"), ShardWriter(tmp_path) as writer:
        writer.write({"__key__": key, "txt": "t"})
    # The unfinished shard is removed on the error, nothing half-written is left behind.
    assert list(tmp_path.iterdir()) == []


def test_duplicate_keys_and_bad_values_are_rejected(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as writer:
        writer.write({"__key__": "k", "txt": "t"})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write({"__key__": "k", "txt": "t"})
        with pytest.raises(TypeError, match="bytes or str"):
            writer.write({"__key__": "k2", "cls": 3})


def test_manifest_totals_and_skips(tmp_path: Path) -> None:
    shards = [{"url": "shard-000000.tar", "samples": 3, "bytes": 1000}, {"url": "b.tar", "samples": 2, "bytes": 500}]
    skipped = [
        {"input": "a.jpg", "reason": "missing_image"},
        {"input": "b.jpg", "reason": "corrupt_image", "detail": "x"},
        {"input": "c.jpg", "reason": "missing_image"},
    ]
    manifest = write_manifest(tmp_path, shards, skipped, extra={"source": "test"})
    assert read_manifest(tmp_path) == manifest
    assert manifest["num_samples"] == 5 and manifest["num_bytes"] == 1500 and manifest["num_shards"] == 2
    assert manifest["skipped_by_reason"] == {"corrupt_image": 1, "missing_image": 2}
    assert manifest["num_skipped"] == 3 and manifest["source"] == "test"
    with pytest.raises(ValueError, match="derived"):
        write_manifest(tmp_path, shards, extra={"num_samples": 9})
    with pytest.raises(ValueError, match="input"):
        write_manifest(tmp_path, shards, [{"reason": "x"}])


def test_clear_shard_dir_refuses_then_removes_only_a_build(tmp_path: Path) -> None:
    _write(tmp_path, _samples(2))
    write_manifest(tmp_path, [])
    write(tmp_path / "notes.txt", "mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        clear_shard_dir(tmp_path)
    clear_shard_dir(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_inspect_manifest_directory_and_tars(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_synthetic(tmp_path, n_train=12, n_val=0, samples_per_shard=5)
    train = tmp_path / "train"
    report = inspect_shards(str(train), num_examples=2)
    assert report["num_samples"] == 12 and report["num_shards"] == 3
    assert {s["from"] for s in report["shards"]} == {"manifest"}
    assert [e["key"] for e in report["examples"]] == ["train-00000000", "train-00000001"]
    assert report["examples"][0]["caption"].endswith(".") and report["examples"][0]["image"].startswith("png 64x64")
    scanned = inspect_shards(str(train / "shard-{000000..000002}.tar"), num_examples=0, scan=True)
    assert scanned["num_samples"] == 12 and scanned["extensions"] == {"json": 12, "png": 12, "txt": 12}
    assert scanned["num_bytes"] == report["num_bytes"]
    entries = with_manifest_entries(str(train / "shard-{000000..000001}.tar"))
    assert [(Path(u).name, e["samples"]) for u, e in entries] == [("shard-000000.tar", 5), ("shard-000001.tar", 5)]
    assert "12 samples" in format_report(report)
    assert main(["shards", "inspect", str(train), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 12 samples" in out and "caption: " in out
    assert main(["shards", "inspect", str(train / "shard-000000.tar"), "--json", "--scan"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 5
    assert main(["shards", "inspect", f"{train}/*.tar", "--json"]) == 0  # a quoted glob, manifest counts kept
    globbed = json.loads(capsys.readouterr().out)
    assert globbed["num_samples"] == 12 and {s["from"] for s in globbed["shards"]} == {"manifest"}


def test_inspect_reports_a_truncated_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path, _samples(4))
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut in the middle of the second member
    report = inspect_shards(str(shard), scan=True)
    assert report["errors"] and report["shards"][0]["samples"] <= 1
    assert main(["shards", "inspect", str(shard)]) == 1
    assert "ERROR" in capsys.readouterr().out
    assert main(["shards", "inspect", str(tmp_path / "gone.tar")]) == 1  # missing shards are errors, not crashes
    assert main(["shards", "inspect", str(tmp_path / "nothing")]) == 2
    assert "no such shard directory" in capsys.readouterr().err
