"""`pretrain shards inspect`: what a shard set holds (counts, sizes, keys, a few samples) before anyone trains on it.

Counts and sizes come from `manifest.json` when the shards' directory has one (no tar is read in full); otherwise
the tar headers are scanned (local files are seeked through, not read), and img2dataset's `NAME_stats.json` beside a
tar counts its failed downloads as skipped. Example samples are always read from the
tars themselves, so a manifest that no longer matches its shards shows up.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pretrain.data.sample import sample_kind
from pretrain.data.urls import MANIFEST_NAME, expand_urls, is_remote
from pretrain.data.video import VIDEO_EXTENSIONS
from pretrain.shards.image_check import IMAGE_SUFFIXES
from pretrain.shards.writer import read_manifest

# webdataset's own split of a member name into sample key and extension: the key ends at the first dot of the
# file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TEXT_PREVIEW = 100


def with_manifest_entries(urls: str | list[str]) -> list[tuple[str, dict[str, Any] | None]]:
    """The shards `urls` names (pretrain.data.urls), each with its entry in its directory's manifest, if any."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    manifests: dict[Path, dict[str, dict[str, Any]]] = {}
    for url in expand_urls(urls):
        entry = None
        if not is_remote(url) and (Path(url).parent / MANIFEST_NAME).exists():
            directory = Path(url).parent
            if directory not in manifests:
                manifests[directory] = {s["url"]: s for s in read_manifest(directory)["shards"]}
            entry = manifests[directory].get(Path(url).name)
        out.append((url, entry))
    return out


def _open_tar(url: str) -> tarfile.TarFile:
    if is_remote(url):  # streamed with a stall timeout and bounded retries, as training reads them
        from pretrain.data.remote import StreamPolicy, open_stream

        return tarfile.open(fileobj=open_stream(url, StreamPolicy()), mode="r|*")
    return tarfile.open(url, mode="r:*")


def iter_samples(url: str, read_limit: int = 0) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes or None}) per sample in tar order; member data is read only for the first `read_limit`
    samples (None otherwise; KEY.json always, which says whether a sample is an interleaved document), so scanning
    a local tar seeks over the image and clip bytes."""
    key, members, seen = None, {}, 0
    with _open_tar(url) as tar:
        for info in tar:
            match = _KEY_EXT.match(info.name) if info.isfile() else None
            if not match:
                continue
            if match.group(1) != key:
                if key is not None:
                    yield key, members
                    seen += 1
                key, members = match.group(1), {}
            f = tar.extractfile(info) if seen < read_limit or match.group(2) == "json" else None
            members[match.group(2)] = f.read() if f is not None else None
        if key is not None:
            yield key, members


def image_count(extensions: Iterable[str]) -> int:
    """Images of one sample: `KEY.jpg`, or `KEY.0.jpg`, `KEY.1.png`, ... for several."""
    return sum("." + ext.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES for ext in extensions)


def describe_sample(key: str, members: dict[str, bytes | None]) -> dict[str, Any]:
    """A short, printable summary of one sample: its extensions, image format/size, caption or first turns."""
    out: dict[str, Any] = {"key": key, "extensions": sorted(members), "images": image_count(members)}
    for ext, data in sorted(members.items()):
        if data is None or ext in ("json", "txt"):
            continue
        if ext in VIDEO_EXTENSIONS:
            video = _load_json(members.get("json")).get("video")
            out["video"] = f"{ext} {len(data)} bytes" + (
                f", {video.get('frames')} frames, {video.get('duration')} s, {video.get('width')}x{video.get('height')}"
                if isinstance(video, dict) else "")
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                described = f"{ext} {image.width}x{image.height} {image.mode}, {len(data)} bytes"
        except Exception as e:  # a sample the trainer would skip: show why, do not stop inspecting
            described = f"{ext} undecodable ({type(e).__name__}), {len(data)} bytes"
        out["image"] = described if "image" not in out else out["image"] + "; " + described
    meta = _load_json(members.get("json"))
    if isinstance(meta.get("conversations"), list):
        out["turns"] = [
            f"{t.get('from')}: {_short(str(t.get('value')))}" for t in meta["conversations"][:2] if isinstance(t, dict)
        ]
    caption = meta.get("caption")
    if caption is None and members.get("txt") is not None:
        caption = members["txt"].decode("utf-8", errors="replace")
    if caption is not None:
        out["caption"] = _short(str(caption))
    return out


def _load_json(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {"error": "bad json"}
    return value if isinstance(value, dict) else {}


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_PREVIEW else text[: _TEXT_PREVIEW - 3] + "..."


def _scan_shard(url: str, examples_left: int, count: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Count a shard's samples and extensions from its headers; describe up to `examples_left` samples.
    Without `count` it stops as soon as it has the examples."""
    extensions: Counter[str] = Counter()
    images: Counter[int] = Counter()  # samples by their number of images
    kinds: Counter[str] = Counter()  # samples by kind (image, images, video, interleaved, text)
    examples: list[dict[str, Any]] = []
    samples, error = 0, None
    try:
        for key, members in iter_samples(url, read_limit=examples_left):
            samples += 1
            extensions.update(members.keys())
            images[image_count(members)] += 1
            kinds[sample_kind(members)] += 1
            if len(examples) < examples_left:
                examples.append({"url": url, **describe_sample(key, members)})
            elif not count:
                break
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated or missing shard is reported, not fatal
        error = f"{type(e).__name__}: {e}"
    size = Path(url).stat().st_size if Path(url).is_file() else None
    shard = {"url": url, "samples": samples, "bytes": size, "extensions": dict(sorted(extensions.items())),
             "images_per_sample": {str(n): c for n, c in sorted(images.items())},
             "samples_by_kind": dict(sorted(kinds.items()))}
    if error:
        shard["error"] = error
    return shard, examples


def inspect_shards(urls: str | list[str], num_examples: int = 3, scan: bool = False) -> dict[str, Any]:
    """Report on a shard set. With manifests (and not `scan`) only the tars needed for the examples are read."""
    entries = with_manifest_entries(urls)
    shards, examples = [], []
    for url, entry in entries:
        if entry is not None and not scan:
            shards.append({"url": url, "samples": entry["samples"], "bytes": entry["bytes"], "from": "manifest"})
            if len(examples) < num_examples:
                examples += _scan_shard(url, num_examples - len(examples), count=False)[1]
            continue
        shard, found = _scan_shard(url, num_examples - len(examples))
        shards.append({**shard, "from": "tar"})
        examples += found
    report: dict[str, Any] = {
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "num_bytes": sum(s["bytes"] or 0 for s in shards),
        "shards": shards,
        "examples": examples,
    }
    scanned = [s for s in shards if "extensions" in s]
    if scanned:
        totals: Counter[str] = Counter()
        per_sample: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        for s in scanned:
            totals.update(s["extensions"])
            per_sample.update(s["images_per_sample"])
            kinds.update(s["samples_by_kind"])
        report["extensions"] = dict(sorted(totals.items()))
        report["samples_by_kind"] = dict(sorted(kinds.items()))
        report["images_per_sample"] = dict(sorted(per_sample.items(), key=lambda kv: int(kv[0])))
    report["skipped_by_reason"] = _skips([url for url, _ in entries])
    report["skipped_by_reason"].update(img2dataset_failures([url for url, entry in entries if entry is None]))
    if "images_per_sample" not in report:  # not scanned: the build's own counts
        report["images_per_sample"] = _skips([url for url, _ in entries], "images_per_sample")
        report["samples_by_kind"] = _skips([url for url, _ in entries], "samples_by_kind")
    errors = [s for s in shards if "error" in s]
    if errors:
        report["errors"] = [{"url": s["url"], "error": s["error"]} for s in errors]
    return report


def _skips(urls: list[str], field: str = "skipped_by_reason") -> dict[str, int]:
    """Build-time skips (or another count of the build: `field`) summed over the manifests of the shards'
    directories."""
    dirs = dict.fromkeys(Path(u).parent for u in urls if not is_remote(u))
    total: Counter[str] = Counter()
    for d in dirs:
        if (d / MANIFEST_NAME).exists():
            total.update(read_manifest(d).get(field, {}))
    return dict(sorted(total.items()))


def img2dataset_failures(urls: list[str]) -> dict[str, int]:
    """What img2dataset could not turn into samples, from the `NAME_stats.json` it writes beside each `NAME.tar`
    (its own manifest): {"failed_to_download": n, "failed_to_resize": m} over the shards that have one."""
    total: Counter[str] = Counter()
    for url in urls:
        stats = Path(url).with_name(Path(url).stem + "_stats.json")
        if is_remote(url) or not stats.is_file():
            continue
        counts = _load_json(stats.read_bytes())
        total.update({k: v for k, v in counts.items() if k.startswith("failed_") and isinstance(v, int) and v})
    return dict(sorted(total.items()))


def format_report(report: dict[str, Any], max_shards: int = 10) -> str:
    """The human-readable form printed by `pretrain shards inspect`."""
    lines = [
        f"{report['num_shards']} shards, {report['num_samples']} samples, {_size(report['num_bytes'])}",
    ]
    if "extensions" in report:
        lines.append("keys: " + ", ".join(f".{ext} x{n}" for ext, n in report["extensions"].items()))
    if report["images_per_sample"]:
        lines.append("samples by images: " + ", ".join(f"{k}: {n}" for k, n in report["images_per_sample"].items()))
    if report.get("samples_by_kind"):
        lines.append("samples by kind: " + ", ".join(f"{k}: {n}" for k, n in report["samples_by_kind"].items()))
    if report["skipped_by_reason"]:
        lines.append("skipped at build: " + ", ".join(f"{r} {n}" for r, n in report["skipped_by_reason"].items()))
    for s in report["shards"][:max_shards]:
        lines.append(f"  {s['url']}: {s['samples']} samples, {_size(s['bytes'])} ({s['from']})")
    if len(report["shards"]) > max_shards:
        lines.append(f"  ... {len(report['shards']) - max_shards} more shards")
    for e in report.get("errors", []):
        lines.append(f"ERROR {e['url']}: {e['error']}")
    for ex in report["examples"]:
        lines.append(f"- {ex['key']} [{' '.join(ex['extensions'])}] {ex.get('image', 'no image')}")
        if "caption" in ex:
            lines.append(f"    caption: {ex['caption']}")
        for turn in ex.get("turns", []):
            lines.append(f"    {turn}")
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
