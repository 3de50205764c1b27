"""Hub-style tables -> Jobs: Parquet files with the images inside (LLaVA-OneVision-Data, The Cauldron, ShareGPT4V,
...), a folder of them as downloaded from the Hub, and a Hugging Face `datasets` `save_to_disk` directory (Arrow IPC
stream files), all read with pyarrow.

Rows are read one Parquet row group (one Arrow batch) at a time, only the columns a sample needs, so memory stays
bounded by the row group whatever the file size (the Hub writes groups of about 100 MB at most). Images keep their
original bytes and travel in the Job to the workers that check them (build.py). The schema is read up front: a
table whose columns we cannot map fails before anything is written, naming its columns and the flags that map them.

Columns understood (`--text-column` picks the text, its kind follows from its type):
- `conversations`: LLaVA turns, a list of {from, value};
- `messages`: a list of {role, content}, content a string or a typed list ({type: image} / {type: text, text});
- `texts`: The Cauldron's list of {user, assistant} pairs;
- a string column (`caption`, `text`): a caption for the one image.
Images (`--image-column`): an Image struct {bytes, path}, a list of them (`images`), raw bytes, or a path (read from
disk, relative to the image root). A conversation without `<image>` placeholders gets one per image at the start
of its first user turn (the images come first in The Cauldron and in typed messages without image items).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.data.errors import BAD_CONVERSATION, EMPTY_TEXT, IMAGE_COUNT_MISMATCH, MISSING_IMAGE, SampleError
from pretrain.shards.build import Job, Skip
from pretrain.shards.sources import IMAGE_TOKEN, RESERVED, USER_ROLES, check_conversations, resolve_image

TEXT_COLUMNS = ("conversations", "messages", "texts", "caption", "text")
IMAGE_COLUMNS = ("images", "image")
NO_IMAGES = "none"  # --image-column none: text-only rows
BATCH_ROWS = 64  # rows converted to Python objects at a time


@dataclass(frozen=True)
class Columns:
    """How one table's columns map to a sample."""

    text: str
    text_kind: str  # conversations | messages | texts | caption
    image: str | None
    image_kind: str | None  # struct | bytes | path, each possibly a list ("list:struct")
    copied: tuple[str, ...]  # scalar columns kept in KEY.json

    @property
    def read(self) -> list[str]:
        return [self.text, *([self.image] if self.image else []), *self.copied]


@dataclass(frozen=True)
class TableFile:
    path: Path
    name: str  # shown in the manifest: "ai2d/train-00000-of-00001.parquet#12"
    arrow: bool  # an Arrow IPC stream (save_to_disk), else Parquet


def _text_kind(kind: pa.DataType) -> str | None:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "caption"
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return None
    names = {f.name for f in kind.value_type}
    for text_kind, needed in (("conversations", {"from", "value"}), ("messages", {"role", "content"}),
                              ("texts", {"user", "assistant"})):
        if needed <= names:
            return text_kind
    return None


def _image_kind(kind: pa.DataType) -> str | None:
    prefix = ""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        prefix, kind = "list:", kind.value_type
    if pa.types.is_struct(kind) and "bytes" in {f.name for f in kind}:
        return prefix + "struct"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return prefix + "bytes"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return prefix + "path"
    return None


def _is_scalar(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind) or pa.types.is_boolean(kind))


def resolve_columns(schema: pa.Schema, where: str, image_column: str | None = None,
                    text_column: str | None = None) -> Columns:
    """Map a table's schema to a sample, or raise ValueError naming the columns found and the flags."""
    found = ", ".join(f"{f.name} ({f.type})" for f in schema)
    flags = (f"map them with --text-column COL (LLaVA conversations, role/content messages, user/assistant texts or "
             f"a caption string) and --image-column COL (an image struct, bytes, a path or a list of them; "
             f"'{NO_IMAGES}' for text-only rows). Columns found: {found}")
    names = schema.names
    text = text_column or next((c for c in TEXT_COLUMNS if c in names and _text_kind(schema.field(c).type)), None)
    if text is None or text not in names:
        raise ValueError(f"{where}: no text column {text_column or 'of a known kind'}; {flags}")
    text_kind = _text_kind(schema.field(text).type)
    if text_kind is None:
        raise ValueError(f"{where}: column {text} ({schema.field(text).type}) is no text kind we read; {flags}")
    if image_column == NO_IMAGES:
        image = None
    else:
        image = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        if image is None or image not in names:
            raise ValueError(f"{where}: no image column {image_column or ' or '.join(IMAGE_COLUMNS)}; {flags}")
    image_kind = _image_kind(schema.field(image).type) if image else None
    if image and image_kind is None:
        raise ValueError(f"{where}: column {image} ({schema.field(image).type}) holds no images we read; {flags}")
    if text_kind == "caption" and image_kind and image_kind.startswith("list:"):
        raise ValueError(f"{where}: a caption ({text}) describes one image, but {image} is a list; {flags}")
    copied = tuple(f.name for f in schema if f.name not in (text, image) and _is_scalar(f.type)
                   and (f.name == "source" or f.name not in RESERVED))  # "source" is kept as original_source
    return Columns(text, text_kind, image, image_kind, copied)


def _save_to_disk_files(directory: Path, split: str | None) -> list[Path]:
    """The Arrow files of a `save_to_disk` directory (a Dataset, or one split of a DatasetDict), in order."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) > 1:
            raise ValueError(f"{directory} holds the splits {splits}: choose one with --split")
        chosen = split or splits[0]
        if chosen not in splits:
            raise ValueError(f"{directory} has no split {chosen!r}; it holds {splits}")
        directory = directory / chosen
    state = json.loads((directory / "state.json").read_text())
    return [directory / f["filename"] for f in state["_data_files"]]


def _in_split(path: Path, root: Path, split: str) -> bool:
    """The Hub's layouts: `SPLIT-00000-of-00004.parquet`, `SPLIT/...`, `data/SPLIT-...`."""
    parts = path.relative_to(root).parts
    return split in parts[:-1] or parts[-1].startswith((f"{split}-", f"{split}_", f"{split}."))


def table_files(file: str | Path, split: str | None = None) -> list[TableFile]:
    """The tables `file` names: a Parquet file, a quoted glob of them, a folder of them (recursively, sorted) or a
    `save_to_disk` directory; `split` keeps one split's files (or picks the split of a DatasetDict)."""
    path = Path(file).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        files, root, arrow = _save_to_disk_files(path, split), path, True
    else:
        if path.is_dir():
            root, files = path, sorted(path.rglob("*.parquet"))
        else:  # a file (its name may hold glob characters: "[", "?") or a glob
            files = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            root = Path(os.path.commonpath([f.parent for f in files])) if files else path.parent
        files = [f for f in files if split is None or _in_split(f, root, split)]
        arrow = False
    if not files:
        raise FileNotFoundError(f"{file}: no Parquet files{f' of split {split!r}' if split else ''} found")
    return [TableFile(f, f.relative_to(root).as_posix(), arrow) for f in files]


def _schema(table: TableFile) -> pa.Schema:
    if table.arrow:
        with pa.memory_map(str(table.path)) as source:
            return pa.ipc.open_stream(source).schema
    return pq.read_schema(table.path)


def _num_rows(table: TableFile) -> int:
    if table.arrow:  # batch headers only: the memory map is never read through
        with pa.memory_map(str(table.path)) as source:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    return pq.ParquetFile(table.path).metadata.num_rows


def _batches(table: TableFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The table's rows, a record batch at a time, with only `columns`."""
    if table.arrow:  # read, not mapped: a mapped file's pages would count as this process's memory
        with pa.OSFile(str(table.path)) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    yield batch.slice(start, BATCH_ROWS).select(columns)
        return
    with pq.ParquetFile(table.path) as parquet:
        # One row group at a time: asked for all of them, pyarrow reads ahead through the whole file.
        for group in range(parquet.metadata.num_row_groups):
            yield from parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False)


def _read_path(path: str, image_root: Path) -> bytes:
    try:
        return Path(resolve_image(path, image_root)).read_bytes()
    except OSError:
        raise SampleError(MISSING_IMAGE, path) from None


def row_images(value: Any, kind: str | None, image_root: Path) -> list[bytes]:
    """The encoded images of one row's image cell, in order."""
    if kind is None or value is None:
        return []
    items = value if kind.startswith("list:") else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):  # the Image struct: bytes, else the file its path names
            item = item.get("bytes") or item.get("path")
        if isinstance(item, str) and item:
            item = _read_path(item, image_root)
        if not isinstance(item, bytes) or not item:
            raise SampleError(MISSING_IMAGE, f"image {i} has neither bytes nor a path")
        out.append(item)
    return out


def _message_text(content: Any, i: int) -> str:
    """A message's content as LLaVA text: a string as is; a typed list's text items, `<image>` for image items."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError(BAD_CONVERSATION, f"message {i}: content must be a string or a list of typed items")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            parts.append(IMAGE_TOKEN)
        elif kind == "text" and isinstance(item.get("text"), str):
            parts.append(item["text"])
        else:
            raise SampleError(BAD_CONVERSATION, f"message {i}: item {item!r:.80} is neither text nor an image")
    return "\n".join(parts)


def to_conversations(value: Any, kind: str) -> list[dict[str, str]]:
    """A conversations / messages / texts cell as LLaVA turns ({from, value})."""
    if not isinstance(value, list) or not value:
        raise SampleError(BAD_CONVERSATION, f"{kind} must be a non-empty list")
    if kind == "conversations":
        return [{"from": t.get("from"), "value": t.get("value")} for t in value]
    turns = []
    for i, entry in enumerate(value):
        if kind == "messages":  # user / assistant / system are turn roles of ours too (checked with the rest)
            turns.append({"from": entry.get("role"), "value": _message_text(entry.get("content"), i)})
        else:  # texts: The Cauldron's {user, assistant} pairs
            turns += [{"from": "human", "value": entry.get("user")}, {"from": "gpt", "value": entry.get("assistant")}]
    return turns


def _place_images(turns: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """Turns without any `<image>` get one per image at the start of the first user turn."""
    values = [t["value"] for t in turns if isinstance(t.get("value"), str)]
    if n_images == 0 or any(IMAGE_TOKEN in v for v in values):
        return turns
    for i, turn in enumerate(turns):
        if turn.get("from") in USER_ROLES and isinstance(turn.get("value"), str):
            placed = {**turn, "value": f"{IMAGE_TOKEN}\n" * n_images + turn["value"]}
            return [*turns[:i], placed, *turns[i + 1:]]
    return turns


def row_job(index: int, where: str, row: dict[str, Any], columns: Columns, image_root: Path) -> Job | Skip:
    """One table row -> a caption Job or a conversation Job carrying its images' bytes."""
    try:
        images = row_images(row.get(columns.image) if columns.image else None, columns.image_kind, image_root)
        text = row.get(columns.text)
        meta: dict[str, Any] = {"source": "parquet"}
        for name in columns.copied:
            if row.get(name) is not None:
                meta["original_source" if name == "source" else name] = row[name]
        if columns.text_kind == "caption":
            if not isinstance(text, str) or not text.strip():
                raise SampleError(EMPTY_TEXT, f"{columns.text} is empty")
            if len(images) != 1:
                raise SampleError(MISSING_IMAGE if not images else IMAGE_COUNT_MISMATCH,
                                  f"{len(images)} images for a caption")
            meta["caption"] = text.strip()
            return Job(index, where, meta, image_data=tuple(images), caption=True)
        turns = _place_images(to_conversations(text, columns.text_kind), len(images))
        check_conversations(turns, len(images))
        meta["conversations"] = turns
        return Job(index, where, meta, image_data=tuple(images))
    except SampleError as e:
        return Skip(index, where, e.reason, e.detail)


def read_hub_tables(file: str | Path, image_column: str | None = None, text_column: str | None = None,
                    split: str | None = None, image_root: str | Path | None = None
                    ) -> tuple[Iterator[Job | Skip], int]:
    """Jobs for every row of the tables `file` names (see `table_files`), streamed a batch at a time, and their
    number. Paths in image columns are relative to `image_root` (default: the folder of the table)."""
    tables = table_files(file, split)
    mapped = [(t, resolve_columns(_schema(t), t.name, image_column, text_column)) for t in tables]
    total = sum(_num_rows(t) for t in tables)

    def jobs() -> Iterator[Job | Skip]:
        index = 0
        for table, columns in mapped:
            root = Path(image_root) if image_root is not None else table.path.parent
            row = 0
            for batch in _batches(table, columns.read):
                for record in batch.to_pylist():
                    yield row_job(index, f"{table.name}#{row}", record, columns, root)
                    index, row = index + 1, row + 1

    return jobs(), total
