"""Clips into shards: LLaVA-Video / OneVision JSON (`"video"` + a `<video>` placeholder, alone or beside images) and
JSON lines; the clip's original bytes as KEY.<container> and its probe in KEY.json; bad clips skipped with their
reason in manifest.json; samples counted by kind."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.clips import make_clip
from helpers.shards import image_bytes, tar_members, write

from pretrain.cli import main
from pretrain.shards.inspection import inspect_shards


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _media(root: Path) -> Path:
    write(root / "a.jpg", image_bytes("JPEG", seed=1))
    write(root / "clips/a.mp4", make_clip(frames=24))
    write(root / "clips/b.webm", make_clip(frames=10, container="webm", codec="libvpx-vp9"))
    good = make_clip(frames=24)
    write(root / "clips/truncated.mp4", good[: len(good) // 2])
    write(root / "clips/audio.mp4", make_clip(frames=0, audio=True))
    write(root / "clips/empty.avi", make_clip(frames=0, container="avi", codec="mpeg4"))
    write(root / "clips/huge.mp4", make_clip(frames=2, width=1280, height=960))
    write(root / "clips/a.gif", b"GIF89a")
    return root


def test_llava_video_records(tmp_path: Path) -> None:
    root = _media(tmp_path / "media")
    records = [
        {"id": "v", "video": "clips/a.mp4", "conversations": _turns("<video>\nWhat happens?", "It brightens.")},
        {"id": "mixed", "video": "clips/b.webm", "image": "a.jpg",
         "conversations": _turns("<image> and <video>: same?", "No.")},
        {"id": "no-placeholder", "video": "clips/a.mp4", "conversations": _turns("What?", "x")},
        {"id": "truncated", "video": "clips/truncated.mp4", "conversations": _turns("<video>", "x")},
        {"id": "audio", "video": "clips/audio.mp4", "conversations": _turns("<video>", "x")},
        {"id": "empty", "video": "clips/empty.avi", "conversations": _turns("<video>", "x")},
        {"id": "huge", "video": "clips/huge.mp4", "conversations": _turns("<video>", "x")},
        {"id": "gif", "video": "clips/a.gif", "conversations": _turns("<video>", "x")},
        {"id": "missing", "video": "clips/nope.mp4", "conversations": _turns("<video>", "x")},
        {"id": "text", "conversations": _turns("Hi?", "Hello.")},
    ]
    out = tmp_path / "out"
    json_path = write(tmp_path / "data.json", json.dumps(records))
    assert main(["shards", "llava", "--json", str(json_path), "--image-root", str(root), "--out", str(out),
                 "--no-progress", "--max-pixels", "1000000"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("data.json#2", "missing_video"), ("data.json#3", "corrupt_video"), ("data.json#4", "no_video_stream"),
        ("data.json#5", "no_video_frames"), ("data.json#6", "video_too_large"),
        ("data.json#7", "unsupported_video_format"), ("data.json#8", "missing_video")]
    assert manifest["samples_by_kind"] == {"text": 1, "video": 2}
    members = tar_members(out / "shard-000000.tar")
    assert sorted(members) == ["000000000.json", "000000000.mp4", "000000001.0.jpg", "000000001.json",
                               "000000001.webm", "000000009.json"]
    assert members["000000000.mp4"] == (root / "clips/a.mp4").read_bytes()  # never re-encoded
    meta = json.loads(members["000000000.json"])
    assert meta["video"]["path"] == "clips/a.mp4"
    assert {k: meta["video"][k] for k in ("frames", "width", "height")} == {"frames": 24, "width": 64, "height": 48}
    assert abs(meta["video"]["duration"] - 2.0) < 0.01 and abs(meta["video"]["fps"] - 12) < 0.05


def test_jsonl_video_and_full_decode(tmp_path: Path) -> None:
    root = _media(tmp_path / "media")
    lines = [{"video": "clips/a.mp4", "conversations": _turns("<video> what?", "Frames.")},
             {"video": "clips/truncated.mp4", "conversations": _turns("<video>", "x")},
             {"video": "clips/b.webm", "caption": "A clip getting brighter."}]
    path = write(tmp_path / "data.jsonl", "\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    assert main(["shards", "jsonl", "--file", str(path), "--image-root", str(root), "--out", str(out),
                 "--no-progress", "--full-decode"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["reason"] for s in manifest["skipped"]] == ["corrupt_video"]
    assert manifest["samples_by_kind"] == {"video": 2}
    members = tar_members(out / "shard-000000.tar")
    assert members["000000002.txt"] == b"A clip getting brighter." and "000000002.webm" in members


def test_inspect_and_verify_count_samples_by_kind(tmp_path: Path, capsys) -> None:
    root = _media(tmp_path / "media")
    write(root / "b.png", image_bytes("PNG", seed=2))
    turns = _turns("<video>\nWhat?", "x")
    records = [{"video": "clips/a.mp4", "conversations": turns},
               {"image": "a.jpg", "conversations": _turns("<image>", "y")},
               {"image": ["a.jpg", "b.png"], "conversations": _turns("<image><image>", "z")},
               {"conversations": _turns("hi", "hello")}]
    out = tmp_path / "out"
    json_path = write(tmp_path / "data.json", json.dumps(records))
    assert main(["shards", "llava", "--json", str(json_path), "--image-root", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    kinds = {"image": 1, "images": 1, "text": 1, "video": 1}
    assert inspect_shards(str(out))["samples_by_kind"] == kinds  # from the manifest
    scanned = inspect_shards(str(out), scan=True)
    assert scanned["samples_by_kind"] == kinds and "24 frames" in scanned["examples"][0]["video"]
