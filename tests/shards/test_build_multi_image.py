"""Converters writing several images per sample (LLaVA JSON, JSON lines) and interleaved documents: images stored as
KEY.0.ext, KEY.1.ext, ... in placeholder order, every bad count or image skipped with its reason, inspect counting
images per sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.shards import bad_images, image_bytes, tar_members, write

from pretrain.cli import main
from pretrain.shards.inspection import inspect_shards


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _images(root: Path) -> Path:
    images = root / "images"
    write(images / "a.jpg", image_bytes("JPEG", seed=1))
    write(images / "b.png", image_bytes("PNG", size=(20, 50), seed=2))
    write(images / "c.webp", image_bytes("WEBP", size=(33, 17), seed=3))
    write(images / "bad.jpg", bad_images()["corrupt.jpg"])
    return images


def _run(args: list[str], out: Path) -> tuple[dict, dict[str, bytes]]:
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "manifest.json").read_text()), tar_members(out / "shard-000000.tar")


def test_llava_several_images_in_placeholder_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = _images(tmp_path)
    records = [
        {"id": "two", "image": ["b.png", "a.jpg"], "conversations": _turns("<image> vs <image>?", "Same.")},
        {"id": "one", "image": "a.jpg", "conversations": _turns("<image>\nWhat?", "Noise.")},
        {"id": "one-in-list", "image": ["c.webp"], "conversations": _turns("<image>", "Noise.")},
        {"id": "three", "image": ["c.webp", "a.jpg", "b.png"],
         "conversations": _turns("<image><image>", "x") + _turns("and <image>?", "y")},
        {"id": "too-few-placeholders", "image": ["a.jpg", "b.png"], "conversations": _turns("<image>", "x")},
        {"id": "too-many-placeholders", "image": ["a.jpg"], "conversations": _turns("<image><image>", "x")},
        {"id": "one-missing", "image": ["a.jpg", "nope.png"], "conversations": _turns("<image><image>", "x")},
        {"id": "one-corrupt", "image": ["bad.jpg", "a.jpg"], "conversations": _turns("<image><image>", "x")},
        {"id": "not-paths", "image": ["a.jpg", 3], "conversations": _turns("<image><image>", "x")},
    ]
    json_path = write(tmp_path / "data.json", json.dumps(records))
    manifest, members = _run(["shards", "llava", "--json", str(json_path), "--image-root", str(images)],
                             tmp_path / "out")
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("data.json#4", "image_count_mismatch"), ("data.json#5", "image_count_mismatch"),
        ("data.json#6", "missing_image"), ("data.json#7", "corrupt_image"), ("data.json#8", "bad_conversation")]
    assert "2 <image> placeholders for 1 image(s)" in manifest["skipped"][1]["detail"]
    assert manifest["num_samples"] == 4 and manifest["images_per_sample"] == {"1": 2, "2": 1, "3": 1}
    assert sorted(members) == [
        "000000000.0.png", "000000000.1.jpg", "000000000.json", "000000001.jpg", "000000001.json",
        "000000002.json", "000000002.webp",
        "000000003.0.webp", "000000003.1.jpg", "000000003.2.png", "000000003.json"]  # fmt: skip
    assert members["000000000.0.png"] == (images / "b.png").read_bytes()  # placeholder order, original bytes
    assert members["000000000.1.jpg"] == (images / "a.jpg").read_bytes()
    two = json.loads(members["000000000.json"])
    assert two["image"] == ["b.png", "a.jpg"] and two["image_sizes"] == [{"width": 20, "height": 50},
                                                                {"width": 40, "height": 30}]
    assert two["conversations"] == records[0]["conversations"]
    assert json.loads(members["000000002.json"])["image"] == "c.webp"  # one image keeps the KEY.ext layout

    report = inspect_shards(str(tmp_path / "out" / "shard-000000.tar"), num_examples=1, scan=True)
    assert report["images_per_sample"] == {"1": 2, "2": 1, "3": 1}
    assert report["examples"][0]["images"] == 2
    assert main(["shards", "inspect", str(tmp_path / "out")]) == 0  # from the manifest
    assert "samples by images: 1: 2, 2: 1, 3: 1" in capsys.readouterr().out


def test_jsonl_image_list(tmp_path: Path) -> None:
    images = _images(tmp_path)
    rows = [
        {"image": ["a.jpg", "c.webp"], "conversations": _turns("<image>\n<image>\nCompare.", "Alike.")},
        {"image": ["a.jpg", "c.webp"], "caption": "two images, one caption"},
        {"image": ["a.jpg"], "caption": "a caption"},
        {"image": ["a.jpg", "c.webp", "b.png"], "conversations": _turns("<image><image>", "x")},
    ]
    path = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in rows))
    manifest, members = _run(["shards", "jsonl", "--file", str(path), "--image-root", str(images)], tmp_path / "out")
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("data.jsonl:2", "image_count_mismatch"), ("data.jsonl:4", "image_count_mismatch")]
    assert sorted(members) == ["000000000.0.jpg", "000000000.1.webp", "000000000.json", "000000002.jpg",
                               "000000002.json", "000000002.txt"]
    assert members["000000000.1.webp"] == (images / "c.webp").read_bytes()


def _documents() -> list:
    return [
        {"texts": ["A cat.", None, "It sleeps.", None, "The end."], "images": [None, "a.jpg", None, "b.png", None],
         "url": "https://example.com/cats"},
        {"texts": ["Only text here.", "Two paragraphs."], "images": [None, None]},
        {"texts": [None, "Under the picture."], "images": ["c.webp", None]},
        {"texts": ["A.", None], "images": [None, "nope.jpg"]},  # missing image
        {"texts": ["A.", None], "images": [None, "bad.jpg"]},  # undecodable
        {"texts": ["A.", "B."], "images": [None]},  # lists that do not align
        {"texts": ["A.", "B."], "images": [None, "a.jpg"]},  # both at one position
        {"texts": [None, None], "images": [None, "a.jpg"]},  # neither at one position
        {"texts": [None, "  "], "images": ["a.jpg", None]},  # no text at all
        {"texts": ["A.", None], "images": [None, "https://example.com/x.jpg"]},  # not downloaded
        {"images": ["a.jpg"]},  # no texts
        "not an object",
    ]


@pytest.mark.slow
def test_interleaved_converter(tmp_path: Path) -> None:
    images = _images(tmp_path)
    path = write(tmp_path / "docs.jsonl", "\n".join(json.dumps(d) for d in _documents()) + "\n{broken")
    manifest, members = _run(["shards", "interleaved", "--file", str(path), "--image-root", str(images)],
                             tmp_path / "out")
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("docs.jsonl:4", "missing_image"), ("docs.jsonl:5", "corrupt_image"), ("docs.jsonl:6", "bad_json"),
        ("docs.jsonl:7", "bad_json"), ("docs.jsonl:8", "bad_json"), ("docs.jsonl:9", "empty_text"),
        ("docs.jsonl:10", "missing_image"), ("docs.jsonl:11", "missing_text"), ("docs.jsonl:12", "bad_json"),
        ("docs.jsonl:13", "bad_json")]
    assert manifest["source"] == "interleaved" and manifest["num_samples"] == 3
    assert manifest["images_per_sample"] == {"0": 1, "1": 1, "2": 1}
    assert sorted(members) == ["000000000.0.jpg", "000000000.1.png", "000000000.json", "000000001.json",
                               "000000002.0.webp", "000000002.json"]
    assert members["000000000.1.png"] == (images / "b.png").read_bytes()
    doc = json.loads(members["000000000.json"])
    assert doc["texts"] == _documents()[0]["texts"] and doc["images"] == _documents()[0]["images"]
    assert [(s["width"], s["height"]) for s in doc["image_sizes"]] == [(40, 30), (20, 50)]
    assert doc["url"] == "https://example.com/cats"
    # The same bytes whatever the worker count.
    _run(["shards", "interleaved", "--file", str(path), "--image-root", str(images), "--workers", "2"],
         tmp_path / "out2")
    assert (tmp_path / "out2" / "shard-000000.tar").read_bytes() == (tmp_path / "out" / "shard-000000.tar").read_bytes()
