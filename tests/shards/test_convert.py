"""The llava / jsonl / folder converters: samples kept as given, every bad input skipped with its reason,
byte-identical output whatever the worker count."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from helpers.shards import SVG, all_members, bad_images, image_bytes, tar_members, write
from PIL import Image

from pretrain.cli import main
from pretrain.shards.build import BuildOptions, build_shards
from pretrain.shards.sources import read_llava, read_table

BAD_REASONS = {
    "truncated.jpg": "truncated_image",
    "truncated.png": "truncated_image",
    "corrupt.jpg": "corrupt_image",
    "empty.jpg": "corrupt_image",
    "vector.svg": "unsupported_image_format",
    "bomb.png": "decompression_bomb",
}


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _llava_input(root: Path) -> tuple[Path, Path, list[dict]]:
    images = root / "images"
    write(images / "coco/a.jpg", image_bytes("JPEG", seed=1))
    write(images / "b.png", image_bytes("PNG", mode="RGBA", seed=2))
    for name, data in bad_images().items():
        write(images / "bad" / name, data)
    records = [
        {"id": "GCC.0001", "image": "coco/a.jpg", "conversations": _turns("<image>\nDescribe.", "A dog.")},
        {"id": "text-only", "conversations": _turns("Hi", "Hello!") + _turns("More?", "No.")},
        {"id": "png", "image": "b.png", "conversations": _turns("What is it?\n<image>", "Noise."), "model": "x"},
        {"id": "missing", "image": "nope.jpg", "conversations": _turns("<image>", "x")},
        *[
            {"id": name, "image": f"bad/{name}", "conversations": _turns("<image>", "x")}
            for name in sorted(bad_images())
        ],
        {"id": "empty-answer", "image": "coco/a.jpg", "conversations": _turns("<image>", "  ")},
        {"id": "no-placeholder", "image": "coco/a.jpg", "conversations": _turns("Describe.", "A dog.")},
        {"id": "two-placeholders", "image": "coco/a.jpg", "conversations": _turns("<image><image>", "A dog.")},
        {"id": "no-turns", "image": "coco/a.jpg", "conversations": "A dog."},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "no-conversations", "image": "coco/a.jpg"},
        ["not", "an", "object"],
    ]
    json_path = write(root / "data.json", json.dumps(records))
    return json_path, images, records


EXPECTED_LLAVA_SKIPS = [
    ("data.json#3", "missing_image"),
    *[(f"data.json#{4 + i}", BAD_REASONS[name]) for i, name in enumerate(sorted(bad_images()))],
    ("data.json#10", "empty_text"),
    ("data.json#11", "image_count_mismatch"),
    ("data.json#12", "image_count_mismatch"),
    ("data.json#13", "bad_conversation"),
    ("data.json#14", "bad_conversation"),
    ("data.json#15", "missing_text"),
    ("data.json#16", "bad_json"),
]


def test_llava_converter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    json_path, images, records = _llava_input(tmp_path)
    out = tmp_path / "out"
    args = ["shards", "llava", "--json", str(json_path), "--image-root", str(images), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert "3 samples in 1 shards" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == EXPECTED_LLAVA_SKIPS
    assert manifest["num_samples"] == 3 and manifest["source"] == "llava"
    assert sum(manifest["skipped_by_reason"].values()) == len(EXPECTED_LLAVA_SKIPS)
    members = tar_members(out / "shard-000000.tar")
    assert sorted(members) == [
        "000000000.jpg", "000000000.json", "000000001.json", "000000002.json", "000000002.png",
    ]  # fmt: skip
    assert members["000000000.jpg"] == (images / "coco/a.jpg").read_bytes()  # original bytes, no re-encode
    assert members["000000002.png"] == (images / "b.png").read_bytes()
    first = json.loads(members["000000000.json"])
    assert first["conversations"] == records[0]["conversations"] and first["id"] == "GCC.0001"
    assert (first["source"], first["image"], first["width"], first["height"]) == ("llava", "coco/a.jpg", 40, 30)
    text_only = json.loads(members["000000001.json"])
    assert text_only["conversations"] == records[1]["conversations"] and "image" not in text_only
    assert json.loads(members["000000002.json"])["model"] == "x"  # other record fields are kept
    # A second run into the same directory must be asked for.
    assert main([*args, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_rerun_is_byte_identical_whatever_the_worker_count(tmp_path: Path) -> None:
    json_path, images, _ = _llava_input(tmp_path)
    base = ["shards", "llava", "--json", str(json_path), "--image-root", str(images), "--samples-per-shard", "2"]
    assert main([*base, "--out", str(tmp_path / "w1"), "--workers", "1", "--no-progress"]) == 0
    assert main([*base, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


@pytest.mark.slow
def test_many_jobs_through_the_pool_keep_input_order(tmp_path: Path) -> None:
    """More jobs than one pool window (256): results still come back in input order."""
    write(tmp_path / "images/a.png", image_bytes("PNG", (8, 8)))
    records = [{"id": str(i), "image": "a.png", "conversations": _turns("<image>", f"answer {i}")} for i in range(600)]
    records[300]["image"] = "absent.png"
    items, total = read_llava(write(tmp_path / "d.json", json.dumps(records)), tmp_path / "images")
    options = BuildOptions(workers=2, progress=False, samples_per_shard=10_000)
    manifest = build_shards(items, tmp_path / "out", options, "llava", total)
    assert manifest["num_samples"] == 599 and manifest["skipped"][0]["input"] == "d.json#300"
    members = tar_members(tmp_path / "out/shard-000000.tar")
    answers = [json.loads(v)["conversations"][1]["value"] for k, v in members.items() if k.endswith(".json")]
    assert answers == [f"answer {i}" for i in range(600) if i != 300]


def test_reencode(tmp_path: Path) -> None:
    """--reencode gives RGB images in the asked format (alpha onto white), shrunk to --max-side."""
    images = tmp_path / "images"
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 0))  # fully transparent red: white once composited
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    write(images / "rgba.png", buf.getvalue())
    write(images / "grey.png", image_bytes("PNG", (50, 50), mode="L"))
    lines = [json.dumps({"image": name, "caption": "c"}) for name in ("rgba.png", "grey.png")]
    items, total = read_table(write(tmp_path / "d.jsonl", "\n".join(lines)), images)
    options = BuildOptions(reencode="jpg", max_side=100, progress=False)
    manifest = build_shards(items, tmp_path / "out", options, "jsonl", total)
    assert manifest["reencode"] == {"format": "jpg", "quality": 95, "max_side": 100}
    members = tar_members(tmp_path / "out/shard-000000.tar")
    big = Image.open(io.BytesIO(members["000000000.jpg"]))
    assert (big.format, big.mode, big.size) == ("JPEG", "RGB", (100, 67))
    assert min(big.getpixel((50, 33))) > 245
    small = Image.open(io.BytesIO(members["000000001.jpg"]))
    assert (small.mode, small.size) == ("RGB", (50, 50))
    # Without --reencode, --max-side would silently do nothing: the command refuses it.
    args = ["shards", "jsonl", "--file", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o2"), "--max-side", "9"]
    assert main(args) == 2


def _jsonl_input(root: Path) -> Path:
    write(root / "img/a.jpg", image_bytes("JPEG"))
    write(root / "img/v.svg", SVG)
    lines = [
        json.dumps({"image": "img/a.jpg", "caption": " a caption ", "url": "http://x/a.jpg"}),
        json.dumps({"image": "img/a.jpg", "text": "from the text column"}),
        json.dumps({"image": "img/a.jpg", "conversations": _turns("<image> what?", "this.")}),
        json.dumps({"conversations": _turns("no image", "fine.")}),
        "{broken json",
        "",  # blank lines are not samples
        json.dumps({"image": "img/a.jpg", "caption": "   "}),
        json.dumps({"image": "img/a.jpg"}),
        json.dumps({"caption": "caption without image"}),
        json.dumps({"image": "img/v.svg", "caption": "vector"}),
        json.dumps({"image": "http://example.com/x.jpg", "caption": "remote"}),
        json.dumps([1, 2]),
    ]
    data = "\n".join(lines).encode() + b'\n{"image": "img/a.jpg", "caption": "caf\xe9"}\n'
    return write(root / "data.jsonl", data)


def test_jsonl_converter(tmp_path: Path) -> None:
    path = _jsonl_input(tmp_path)
    out = tmp_path / "out"
    assert main(["shards", "jsonl", "--file", str(path), "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("data.jsonl:5", "bad_json"),
        ("data.jsonl:7", "empty_text"),
        ("data.jsonl:8", "missing_text"),
        ("data.jsonl:9", "missing_image"),
        ("data.jsonl:10", "unsupported_image_format"),
        ("data.jsonl:11", "missing_image"),
        ("data.jsonl:12", "bad_json"),
        ("data.jsonl:13", "bad_utf8"),
    ]
    members = all_members(out)
    assert sorted(members) == [
        "000000000.jpg", "000000000.json", "000000000.txt", "000000001.jpg", "000000001.json", "000000001.txt",
        "000000002.jpg", "000000002.json", "000000003.json",
    ]  # fmt: skip
    assert members["000000000.txt"] == b"a caption"
    meta = json.loads(members["000000000.json"])
    assert (meta["caption"], meta["url"], meta["source"]) == ("a caption", "http://x/a.jpg", "jsonl")
    assert meta["image"] == "img/a.jpg"
    assert json.loads(members["000000001.json"])["caption"] == "from the text column"
    assert json.loads(members["000000002.json"])["conversations"][0]["value"] == "<image> what?"
    assert "000000002.txt" not in members  # conversations are not captions


def test_csv_converter_with_custom_columns(tmp_path: Path) -> None:
    write(tmp_path / "imgs/a.jpg", image_bytes("JPEG"))
    conv = json.dumps(_turns("<image>", "ok")).replace('"', '""')
    rows = [
        "file,alt,turns,license",
        "a.jpg,first caption,,cc-by",
        "a.jpg,,,cc-by",
        "a.jpg,too,many,fields,here",
        f'a.jpg,,"{conv}",cc0',
        'a.jpg,,"[not json",cc0',
        "missing.jpg,lost,,cc0",
    ]
    csv_bytes = ("\n".join(rows) + "\n").encode() + b"a.jpg,bad \xff bytes,,cc0\n"
    path = write(tmp_path / "data.csv", csv_bytes)
    out = tmp_path / "out"
    args = ["shards", "jsonl", "--file", str(path), "--image-root", str(tmp_path / "imgs"), "--out", str(out)]
    cols = ["--image-column", "file", "--caption-column", "alt", "--conversations-column", "turns"]
    assert main([*args, *cols, "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("data.csv:3", "empty_text"),
        ("data.csv:4", "bad_row"),
        ("data.csv:6", "bad_json"),
        ("data.csv:7", "missing_image"),
        ("data.csv:8", "bad_utf8"),
    ]
    members = all_members(out)
    assert members["000000000.txt"] == b"first caption"
    assert json.loads(members["000000000.json"])["license"] == "cc-by"
    assert json.loads(members["000000003.json"])["conversations"] == _turns("<image>", "ok")


def test_folder_converter(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    write(root / "a/001.jpg", image_bytes("JPEG", seed=1))
    write(root / "a/001.txt", "a photo\n")
    write(root / "a/002.webp", image_bytes("WEBP", seed=2))
    write(root / "a/002.txt", "a webp photo")
    write(root / "b/003.png", image_bytes("PNG", seed=3))
    write(root / "b/003.txt", "  \n")
    write(root / "b/004.jpg", image_bytes("JPEG", seed=4))  # no caption file
    write(root / "b/005.svg", SVG)
    write(root / "b/005.txt", "vector")
    write(root / "b/006.txt", "caption without image")
    write(root / "b/007.jpg", image_bytes("JPEG", seed=7))
    write(root / "b/007.txt", b"bad \xff\xfe utf8")
    write(root / "b/notes.md", "ignored")
    out = tmp_path / "out"
    assert main(["shards", "folder", "--images", str(root), "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("b/003.png", "empty_text"),
        ("b/004.jpg", "missing_text"),
        ("b/005.svg", "unsupported_image_format"),
        ("b/006.txt", "missing_image"),
        ("b/007.jpg", "bad_utf8"),
    ]
    members = all_members(out)
    assert sorted(members) == [
        "000000000.jpg", "000000000.json", "000000000.txt", "000000001.json", "000000001.txt", "000000001.webp",
    ]  # fmt: skip
    assert members["000000000.txt"] == b"a photo"
    assert members["000000001.webp"] == (root / "a/002.webp").read_bytes()
    assert json.loads(members["000000000.json"])["image"] == "a/001.jpg"


def test_input_errors_stop_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write(tmp_path / "obj.json", "{}")
    write(tmp_path / "broken.json", "[{")
    for name in ("obj.json", "broken.json", "absent.json"):
        args = ["shards", "llava", "--json", str(tmp_path / name), "--image-root", str(tmp_path)]
        assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2, name
    assert main(["shards", "folder", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    # Everything skipped: the build is written (with its manifest) but the command fails.
    write(tmp_path / "allbad.jsonl", '{"image": "x.jpg", "caption": "c"}\n')
    assert main(["shards", "jsonl", "--file", str(tmp_path / "allbad.jsonl"), "--out", str(tmp_path / "o2")]) == 1
    assert json.loads((tmp_path / "o2/manifest.json").read_text())["skipped_by_reason"] == {"missing_image": 1}
    assert "no usable samples" in capsys.readouterr().err


def test_max_pixels_and_full_decode(tmp_path: Path) -> None:
    jpeg = image_bytes("JPEG", (64, 64))
    # Corrupt scan data inside a complete JPEG: found only by a full decode.
    damaged = jpeg[:400] + b"\xff\x00" * 40 + jpeg[480:]
    write(tmp_path / "img/ok.jpg", jpeg)
    write(tmp_path / "img/damaged.jpg", damaged)
    lines = [json.dumps({"image": f"img/{n}", "caption": "c"}) for n in ("ok.jpg", "damaged.jpg")]
    path = write(tmp_path / "d.jsonl", "\n".join(lines))
    base = ["shards", "jsonl", "--file", str(path), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "o1"), "--max-pixels", "1000"]) == 1
    assert json.loads((tmp_path / "o1/manifest.json").read_text())["skipped_by_reason"] == {"decompression_bomb": 2}
    assert main([*base, "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2/manifest.json").read_text())["num_samples"] == 2
    assert main([*base, "--out", str(tmp_path / "o3"), "--full-decode"]) == 0
    skipped = json.loads((tmp_path / "o3/manifest.json").read_text())["skipped"]
    assert [(s["input"], s["reason"]) for s in skipped] in (
        [("d.jsonl:2", "corrupt_image")],
        [("d.jsonl:2", "truncated_image")],
    )
