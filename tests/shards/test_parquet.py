"""`pretrain shards parquet`: the Hub's table schemas (LLaVA-OneVision's image + conversations, The Cauldron's images +
texts, role/content messages, captions) and `save_to_disk` directories written by the real `datasets`, read with
pyarrow a batch at a time; images kept byte for byte, bad rows skipped with their reason, unknown schemas refused
with the columns found."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.shards import all_members, bad_images, image_bytes

from pretrain.cli import main
from pretrain.shards.hub_tables import read_hub_tables

JPEG, PNG = image_bytes("JPEG", seed=1), image_bytes("PNG", (20, 50), seed=2)
CORRUPT = bad_images()["corrupt.jpg"]


def _image(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def _build(tmp_path: Path, file: Path | str, *flags: str) -> tuple[dict, dict[str, bytes]]:
    out = tmp_path / "out"
    assert main(["shards", "parquet", "--file", str(file), "--out", str(out), "--no-progress", *flags]) == 0
    return json.loads((out / "manifest.json").read_text()), all_members(out)


def _meta(members: dict[str, bytes], key: str) -> dict:
    return json.loads(members[f"{key}.json"])


def test_onevision_image_and_conversations(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    table = pa.table({
        "id": ["a", "b", "c", "d", "e", "f"],
        "image": [_image(JPEG), _image(PNG, "b.png"), None, _image(CORRUPT), _image(None, "on_disk.png"),
                  _image(None, "https://example.com/f.jpg")],
        "conversations": [turns, turns, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
                          turns, turns, turns],
        "data_source": ["vqa"] * 6,
    })
    (tmp_path / "on_disk.png").write_bytes(PNG)  # an Image struct with only a path: the file beside the table
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    manifest, members = _build(tmp_path, tmp_path / "*.parquet")
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("train-00000-of-00001.parquet#3", "corrupt_image"), ("train-00000-of-00001.parquet#5", "missing_image")]
    assert "fetch them first, e.g. with img2dataset" in manifest["skipped"][1]["detail"]
    assert members["000000000.jpg"] == JPEG and members["000000001.png"] == PNG  # the original bytes
    assert members["000000004.png"] == PNG
    assert "000000002.json" in members and not any(k.startswith("000000002.") and k != "000000002.json"
                                                   for k in members)  # text only
    meta = _meta(members, "000000000")
    assert meta["conversations"] == turns and meta["id"] == "a" and meta["data_source"] == "vqa"
    assert (meta["width"], meta["height"], meta["source"]) == (40, 30, "parquet")


def test_cauldron_images_and_texts_get_placeholders(tmp_path: Path) -> None:
    table = pa.table({
        "images": [[_image(JPEG), _image(PNG)], [_image(PNG)], [], [_image(JPEG)]],
        "texts": [[{"user": "Same?", "assistant": "No.", "source": "s"}],
                  [{"user": "Colour?", "assistant": "Grey.", "source": "s"},
                   {"user": "Size?", "assistant": "Small.", "source": "s"}],
                  [{"user": "Text only?", "assistant": "Yes.", "source": "s"}],
                  [{"user": "Empty answer", "assistant": "  ", "source": "s"}]],
    })
    folder = tmp_path / "the_cauldron"
    (folder / "ai2d").mkdir(parents=True)
    pq.write_table(table, folder / "ai2d" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), folder / "ai2d" / "test-00000-of-00001.parquet")  # another split: left out
    manifest, members = _build(tmp_path, folder, "--split", "train")
    assert [(s["input"], s["reason"]) for s in manifest["skipped"]] == [
        ("ai2d/train-00000-of-00001.parquet#3", "empty_text")]
    assert members["000000000.0.jpg"] == JPEG and members["000000000.1.png"] == PNG
    assert _meta(members, "000000000")["conversations"] == [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    assert [t["value"] for t in _meta(members, "000000001")["conversations"]] == [
        "<image>\nColour?", "Grey.", "Size?", "Small."]
    assert _meta(members, "000000002")["conversations"][0]["value"] == "Text only?"
    assert manifest["images_per_sample"] == {"0": 1, "1": 1, "2": 1}


def test_typed_messages_and_captions(tmp_path: Path) -> None:
    image, text = {"type": "image", "text": None}, {"type": "text", "text": "Which is larger?"}
    table = pa.table({
        "images": [[_image(JPEG), _image(PNG)], [_image(JPEG)], [_image(JPEG)]],
        "messages": [[{"role": "user", "content": [image, text, image]},
                      {"role": "assistant", "content": [{"type": "text", "text": "The second."}]}],
                     [{"role": "user", "content": [image, image]},
                      {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
                     [{"role": "critic", "content": [text]}]],
    })
    pq.write_table(table, tmp_path / "messages.parquet")
    manifest, members = _build(tmp_path, tmp_path / "messages.parquet")
    assert [s["reason"] for s in manifest["skipped"]] == ["image_count_mismatch", "bad_conversation"]
    assert _meta(members, "000000000")["conversations"] == [
        {"from": "user", "value": "<image>\nWhich is larger?\n<image>"}, {"from": "assistant", "value": "The second."}]

    captions = pa.table({"jpg": [JPEG, PNG], "alt": ["A grey square.", ""], "source": ["coco", "coco"]})
    pq.write_table(captions, tmp_path / "captions.parquet")
    out = tmp_path / "captions"
    assert main(["shards", "parquet", "--file", str(tmp_path / "captions.parquet"), "--out", str(out),
                 "--image-column", "jpg", "--text-column", "alt", "--no-progress"]) == 0
    members = all_members(out)
    assert members["000000000.txt"] == b"A grey square." and members["000000000.jpg"] == JPEG
    assert _meta(members, "000000000")["original_source"] == "coco"
    assert json.loads((out / "manifest.json").read_text())["skipped_by_reason"] == {"empty_text": 1}


def test_unknown_schema_names_the_columns_and_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pq.write_table(pa.table({"picture": [JPEG], "question": ["Q"], "answer": ["A"]}), tmp_path / "odd.parquet")
    code = main(["shards", "parquet", "--file", str(tmp_path / "odd.parquet"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out" / "manifest.json").exists()
    assert "picture (binary), question (string), answer (string)" in err
    assert "--text-column" in err and "--image-column" in err
    # A caption column found, but no image column under a known name: refused too, not built as text only.
    pq.write_table(pa.table({"picture": [JPEG], "caption": ["A"]}), tmp_path / "odd.parquet")
    assert main(["shards", "parquet", "--file", str(tmp_path / "odd.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "no image column images or image" in capsys.readouterr().err


def test_save_to_disk_directories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import datasets  # the dev extra's: writes the real format (the product reads it with pyarrow alone)

    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]
    features = datasets.Features({"image": datasets.Image(), "conversations": datasets.List(
        {"from": datasets.Value("string"), "value": datasets.Value("string")})})
    rows = {"image": [{"bytes": data, "path": None} for data in (JPEG, PNG, JPEG)], "conversations": [turns] * 3}
    train = datasets.Dataset.from_dict(rows, features=features)
    train.save_to_disk(str(tmp_path / "single"), num_shards=2)
    manifest, members = _build(tmp_path, tmp_path / "single")
    assert manifest["num_samples"] == 3 and members["000000001.png"] == PNG and members["000000002.jpg"] == JPEG
    assert manifest["skipped"] == []

    both = datasets.DatasetDict({"train": train, "test": train.select([1])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert main(["shards", "parquet", "--file", str(tmp_path / "dict"), "--out", str(tmp_path / "o")]) == 2
    assert "choose one with --split" in capsys.readouterr().err
    manifest, members = _build(tmp_path / "t", tmp_path / "dict", "--split", "test")
    assert manifest["num_samples"] == 1 and members["000000000.png"] == PNG


def test_rows_are_read_a_batch_at_a_time(tmp_path: Path) -> None:
    """Arrow holds about one row group while the jobs stream, not the file: 20 row groups of 1 MB each."""
    blob = image_bytes("PNG", (8, 8))
    rows = 200
    images = [_image(blob + bytes([i % 256]) * 100_000) for i in range(rows)]
    table = pa.table({"image": images, "caption": ["x"] * rows})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=10, use_dictionary=False, compression="none")
    del table, images
    baseline = pa.total_allocated_bytes()
    jobs, total = read_hub_tables(tmp_path / "big.parquet")
    peak = 0
    for job in jobs:
        peak = max(peak, pa.total_allocated_bytes() - baseline)
        assert len(job.image_data[0]) > 100_000
    assert total == rows and peak < 8 * 10 * 100_000, peak  # the file is 20 MB


@pytest.mark.slow
def test_workers_give_the_same_shards(tmp_path: Path) -> None:
    images = [[_image(image_bytes("JPEG", seed=i)), _image(PNG)] for i in range(12)]
    texts = [[{"user": f"Q{i}", "assistant": f"A{i}"}] for i in range(12)]
    pq.write_table(pa.table({"images": images, "texts": texts}), tmp_path / "t.parquet", row_group_size=5)
    shards = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["shards", "parquet", "--file", str(tmp_path / "t.parquet"), "--out", str(out), "--workers",
                     str(workers), "--samples-per-shard", "5", "--no-progress"]) == 0
        shards[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    assert len(shards[1]) == 3 and shards[1] == shards[2]
