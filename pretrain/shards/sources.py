"""Source readers for the converters: LLaVA JSON, JSON lines / CSV, image folders with caption files, and
interleaved documents (OBELICS / MMC4 style JSON lines).

Each reader yields `Job`s and `Skip`s in input order (see convert.py). Everything that can be decided from the
input file alone (a broken JSON line, an empty caption, a malformed conversation) is decided here; reading and
checking image bytes is left to the workers.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pretrain.data.errors import (
    BAD_CONVERSATION,
    BAD_JSON,
    BAD_UTF8,
    EMPTY_TEXT,
    IMAGE_COUNT_MISMATCH,
    MISSING_IMAGE,
    MISSING_TEXT,
    MISSING_VIDEO,
    SampleError,
)
from pretrain.shards.build import Job, Skip
from pretrain.shards.image_check import IMAGE_SUFFIXES

BAD_ROW = "bad_row"  # a CSV row whose field count does not match the header
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
ROLES = USER_ROLES + ASSISTANT_ROLES + ("system",)
# Keys we set in KEY.json; a user column or record field with one of these names is not copied over them.
RESERVED = ("caption", "conversations", "image", "video", "source", "width", "height", "image_sizes")
CAPTION_COLUMNS = ("caption", "text")


def check_conversations(conversations: Any, n_images: int, n_videos: int = 0) -> None:
    """Raise SampleError unless `conversations` is a usable LLaVA conversation for a sample with `n_images` images
    (one `<image>` placeholder per image) and `n_videos` clips (one `<video>` placeholder each)."""
    if conversations is None:
        raise SampleError(MISSING_TEXT, "no conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(BAD_CONVERSATION, "conversations must be a non-empty list of turns")
    images = videos = 0
    answered = False
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise SampleError(BAD_CONVERSATION, f"turn {i} needs 'from' in {list(ROLES)} and a string 'value'")
        images += turn["value"].count(IMAGE_TOKEN)
        videos += turn["value"].count(VIDEO_TOKEN)
        if turn["from"] in ASSISTANT_ROLES:
            if not turn["value"].strip():
                raise SampleError(EMPTY_TEXT, f"turn {i} ({turn['from']}) is empty")
            if IMAGE_TOKEN in turn["value"] or VIDEO_TOKEN in turn["value"]:
                raise SampleError(BAD_CONVERSATION, f"turn {i}: a placeholder in an assistant turn")
            answered = True
    if not answered:
        raise SampleError(BAD_CONVERSATION, "no assistant turn")
    # Placeholders and images pair up in order: exactly as many of one as of the other.
    if images != n_images:
        raise SampleError(IMAGE_COUNT_MISMATCH, f"{images} {IMAGE_TOKEN} placeholders for {n_images} image(s)")
    if videos != n_videos:
        raise SampleError(MISSING_VIDEO, f"{videos} {VIDEO_TOKEN} placeholders for {n_videos} clip(s)")


def _image_field(value: Any) -> list[str]:
    """A record's image paths: one path, or a list of them (in placeholder order)."""
    if value is None or value == "" or value == []:
        return []
    paths = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in paths):
        raise SampleError(BAD_CONVERSATION, f"image must be a path or a list of paths, got {value!r:.80}")
    return paths


def _video_field(value: Any) -> str | None:
    """A record's clip path (LLaVA-Video / OneVision `"video": "clips/a.mp4"`): one clip per record."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SampleError(BAD_CONVERSATION, f"video must be one path, got {value!r:.80}")
    return value


def resolve_image(image: str, image_root: Path) -> str:
    """The file an image path of a record names; a URL is an error that says how to fetch it."""
    if "://" in image:
        raise SampleError(MISSING_IMAGE, f"{image}: URLs are not downloaded (fetch them first, e.g. with img2dataset)")
    return str(image_root / image)


def _copy_fields(record: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in RESERVED and k not in skip}


def llava_job(index: int, where: str, record: Any, image_root: Path, source: str = "llava") -> Job | Skip:
    """A LLaVA record ({"id", "image"?, "conversations"}) -> a Job keeping the conversation exactly as given."""
    try:
        if not isinstance(record, dict):
            raise SampleError(BAD_JSON, f"record is a {type(record).__name__}, not an object")
        images = _image_field(record.get("image"))
        video = _video_field(record.get("video"))
        check_conversations(record.get("conversations"), len(images), int(video is not None))
        meta = {"conversations": record["conversations"], "source": source, **_copy_fields(record, ())}
        if "source" in record:
            meta["original_source"] = record["source"]
        if video is not None:  # KEY.<container>; its probe lands in meta["video"] (build.process)
            meta["video"] = video
            return Job(index, where, meta, image_paths=tuple(resolve_image(i, image_root) for i in images),
                       video_path=resolve_image(video, image_root))
        if not images:
            return Job(index, where, meta)
        if len(images) > 1:  # stored as KEY.0.ext, KEY.1.ext, ...
            meta["image"] = images
            return Job(index, where, meta, image_paths=tuple(resolve_image(i, image_root) for i in images))
        meta["image"] = images[0]
        return Job(index, where, meta, image_path=resolve_image(images[0], image_root))
    except SampleError as e:
        return Skip(index, where, e.reason, e.detail)


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed value or SampleError) for every non-blank line; decoding problems are per line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield where, SampleError(BAD_UTF8, str(e))
            except json.JSONDecodeError as e:
                yield where, SampleError(BAD_JSON, str(e))


def entry_jobs(entries: list[tuple[str, Any]], make_job: Callable[[int, str, Any], Job | Skip]
               ) -> tuple[Iterator[Job | Skip], int]:
    """Jobs for records read up front as (where, record); a record that could not be read (a SampleError) is a
    Skip with its reason. Returns the jobs and their count."""
    def jobs() -> Iterator[Job | Skip]:
        for index, (where, record) in enumerate(entries):
            if isinstance(record, SampleError):
                yield Skip(index, where, record.reason, record.detail)
            else:
                yield make_job(index, where, record)

    return jobs(), len(entries)


def read_llava(json_path: str | Path, image_root: str | Path) -> tuple[Iterator[Job | Skip], int | None]:
    """Jobs for a LLaVA JSON array file (or JSON lines when the name ends in .jsonl), and their number if known."""
    path, root = Path(json_path), Path(image_root)
    if path.suffix == ".jsonl":
        entries = list(_json_lines(path))
    else:
        with open(path, "rb") as f:
            data = json.load(f)  # a broken top-level file is the user's error, raised to the command
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of samples, got {type(data).__name__}")
        entries = [(f"{path.name}#{i}", record) for i, record in enumerate(data)]

    return entry_jobs(entries, lambda index, where, record: llava_job(index, where, record, root))


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, restkey="\0extra")
    for row in reader:
        where = f"{path.name}:{reader.line_num}"
        if "\0extra" in row or None in row.values():
            yield where, SampleError(BAD_ROW, f"{len(reader.fieldnames or [])} columns expected")
        elif any("\udc80" <= ch <= "\udcff" for value in row.values() for ch in value):
            yield where, SampleError(BAD_UTF8, "undecodable bytes")
        else:
            yield where, row


def table_job(
    index: int, where: str, row: Any, image_root: Path, columns: dict[str, str | None], from_csv: bool
) -> Job | Skip:
    """A JSON-lines record or CSV row -> a caption Job or a conversation Job."""
    try:
        if not isinstance(row, dict):
            raise SampleError(BAD_JSON, f"line is a {type(row).__name__}, not an object")
        images = _image_field(row.get(columns["image"]))
        conversations = row.get(columns["conversations"] or "")
        if conversations not in (None, ""):
            if from_csv and isinstance(conversations, str):
                try:
                    conversations = json.loads(conversations)
                except json.JSONDecodeError as e:
                    raise SampleError(BAD_JSON, f"conversations column: {e}") from None
            record = {**row, "image": images, "conversations": conversations}
            return llava_job(index, where, record, image_root, source="jsonl")
        caption_column = columns["caption"] or next((c for c in CAPTION_COLUMNS if c in row), None)
        caption = row.get(caption_column) if caption_column else None
        if caption is None:
            raise SampleError(MISSING_TEXT, f"no {caption_column or ' or '.join(CAPTION_COLUMNS)} and no conversations")
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError(EMPTY_TEXT, f"{caption_column} is empty")
        used = (columns["image"], caption_column, columns["conversations"] or "", "video")
        video = _video_field(row.get("video"))
        if video is not None and not images:  # a captioned clip: KEY.<container> + KEY.txt
            meta = {"caption": caption.strip(), "video": video, "source": "jsonl", **_copy_fields(row, used)}
            return Job(index, where, meta, video_path=resolve_image(video, image_root), caption=True)
        if not images:
            raise SampleError(MISSING_IMAGE, f"no {columns['image']} for a caption sample")
        if len(images) > 1:
            raise SampleError(IMAGE_COUNT_MISMATCH, f"{len(images)} images for a caption (conversations pair several "
                              f"images with {IMAGE_TOKEN} placeholders)")
        image = images[0]
        meta = {"caption": caption.strip(), "image": image, "source": "jsonl", **_copy_fields(row, used)}
        return Job(index, where, meta, image_path=resolve_image(image, image_root), caption=True)
    except SampleError as e:
        return Skip(index, where, e.reason, e.detail)


def read_table(
    file: str | Path,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    conversations_column: str = "conversations",
    fmt: str = "auto",
) -> tuple[Iterator[Job | Skip], int | None]:
    """Jobs for JSON lines (`fmt` jsonl) or CSV/TSV. Image paths are relative to `image_root` (default: the file's
    folder). `caption_column` None means the first of 'caption', 'text' that a row has."""
    path = Path(file)
    root = Path(image_root) if image_root is not None else path.parent
    if fmt == "auto":
        fmt = {".csv": "csv", ".tsv": "tsv"}.get(path.suffix.lower(), "jsonl")
    if fmt == "jsonl":
        rows = _json_lines(path)
    elif fmt in ("csv", "tsv"):
        rows = _csv_rows(path, "," if fmt == "csv" else "\t")
    else:
        raise ValueError(f"unknown format {fmt!r}; valid: auto, jsonl, csv, tsv")
    columns = {"image": image_column, "caption": caption_column, "conversations": conversations_column}
    entries = list(rows)

    return entry_jobs(entries, lambda index, where, row: table_job(index, where, row, root, columns,
                                                                    from_csv=fmt != "jsonl"))


def read_folder(images: str | Path) -> tuple[Iterator[Job | Skip], int]:
    """Jobs for every image under `images` (recursively, sorted) with its caption in the `.txt` beside it.
    Caption files without an image are reported as skipped; other files are ignored."""
    root = Path(images)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    image_stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    entries = [
        p
        for p in files
        if p.suffix.lower() in IMAGE_SUFFIXES or (p.suffix == ".txt" and p.with_suffix("") not in image_stems)
    ]

    def jobs() -> Iterator[Job | Skip]:
        for index, path in enumerate(entries):
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".txt":
                yield Skip(index, rel, MISSING_IMAGE, "caption file without an image")
                continue
            meta = {"image": rel, "source": "folder"}
            yield Job(index, rel, meta, image_path=str(path), caption_path=str(path.with_suffix(".txt")), caption=True)

    return jobs(), len(entries)


def interleaved_job(index: int, where: str, record: Any, image_root: Path) -> Job | Skip:
    """An OBELICS / MMC4 style document ({"texts": [...], "images": [...]}, null in one list where the other holds
    the item) -> a Job keeping both lists as given; its images are stored as KEY.0.ext, KEY.1.ext, ... in order."""
    try:
        if not isinstance(record, dict):
            raise SampleError(BAD_JSON, f"line is a {type(record).__name__}, not an object")
        texts, images = record.get("texts"), record.get("images")
        if not isinstance(texts, list) or not isinstance(images, list):
            raise SampleError(MISSING_TEXT, "an interleaved document needs 'texts' and 'images' lists")
        if len(texts) != len(images):
            raise SampleError(BAD_JSON, f"{len(texts)} texts but {len(images)} images: the lists must align")
        for i, (text, image) in enumerate(zip(texts, images)):
            if (text is None) == (image is None):
                raise SampleError(BAD_JSON, f"item {i}: exactly one of texts[{i}] and images[{i}] must be null")
            if not isinstance(text if image is None else image, str):
                raise SampleError(BAD_JSON, f"item {i}: not a string")
        if not any(t and t.strip() for t in texts):
            raise SampleError(EMPTY_TEXT, "no text in the document")
        paths = [resolve_image(image, image_root) for image in images if image is not None]
        meta = {"texts": texts, "images": images, "source": "interleaved", **_copy_fields(record, ("texts", "images"))}
        return Job(index, where, meta, image_paths=tuple(paths))
    except SampleError as e:
        return Skip(index, where, e.reason, e.detail)


def read_interleaved(file: str | Path, image_root: str | Path | None = None) -> tuple[Iterator[Job | Skip], int]:
    """Jobs for a JSON lines file of interleaved documents; image paths are relative to `image_root` (default: the
    file's folder)."""
    path = Path(file)
    root = Path(image_root) if image_root is not None else path.parent
    entries = list(_json_lines(path))

    return entry_jobs(entries, lambda index, where, record: interleaved_job(index, where, record, root))
