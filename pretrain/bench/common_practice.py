"""The data path most LLaVA-style training code uses today, as the baseline of both benchmarks.

Per sample: the image decoded to an RGB PIL image, the vision tower's transformers image processor called on it,
the text tokenized with the image placeholder expanded to the tower's token count (as `LlavaProcessor` does), and
batches padded to their longest sample (LLaVA's `DataCollatorForSupervisedDataset`): one sample per row, no packing.
`webdataset_loader` reads shards through webdataset's own pipeline (`WebDataset(...).decode("pil")`);
`LlavaShardDataset` is the map-style dataset of LLaVA's `LazySupervisedDataset`, reading from the same shards.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

IGNORE = -100
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key rule


class LlavaStyleSample:
    """PIL image + caption -> input_ids, labels (caption only), pixel_values."""

    def __init__(self, image_processor: Any, tokenizer: Any, image_token_id: int, image_tokens: int,
                 max_length: int) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token_id, self.image_tokens, self.max_length = image_token_id, image_tokens, max_length

    def __call__(self, image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prompt = bos + [self.image_token_id] * self.image_tokens
        target = tok(caption.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + target)[: self.max_length]
        labels = ([IGNORE] * len(prompt) + target)[: self.max_length]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def caption_of(sample: dict) -> str:
    meta = sample.get("json")
    if isinstance(meta, bytes | str):
        meta = json.loads(meta)
    if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        return meta["caption"]
    text = sample["txt"]
    return text.decode("utf-8") if isinstance(text, bytes) else text


def llava_collate(pad_id: int):
    """LLaVA's collator: pad to the longest sample, attention where input_ids != pad, images stacked."""

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=pad_id)
        labels = pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad_id),
                "pixel_values": torch.stack([s["pixel_values"] for s in samples])}

    return collate


def webdataset_loader(urls: list[str], make: LlavaStyleSample, batch_size: int, workers: int, pad_id: int,
                      shuffle_buffer: int, seed: int = 0) -> DataLoader:
    """An endless loader: webdataset's resampled shard stream, its sample shuffle, PIL decoding, then `make`."""
    import webdataset as wds

    def to_model_inputs(sample: dict) -> dict[str, torch.Tensor]:
        image = next(sample[k] for k in IMAGE_KEYS if k in sample)
        return make(image, caption_of(sample))

    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed)
               .shuffle(shuffle_buffer).decode("pil").map(to_model_inputs))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=llava_collate(pad_id),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


class LlavaShardDataset(Dataset):
    """Map-style: sample i read from its shard by offset, decoded with `Image.open(...).convert("RGB")`."""

    def __init__(self, urls: list[str], make: LlavaStyleSample) -> None:
        self.make = make
        self.index: list[tuple[str, dict[str, tuple[int, int]]]] = []
        for url in urls:
            self.index += _tar_index(url)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, members = self.index[i]
        parts = {}
        with open(path, "rb") as f:
            for ext, (offset, size) in members.items():
                f.seek(offset)
                parts[ext] = f.read(size)
        data = next(parts[k] for k in IMAGE_KEYS if k in parts)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return self.make(image, caption_of(parts))


def _tar_index(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a tar as member offsets (headers only, the way a JSON list of image paths is read up front)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            m = _KEY_EXT.match(info.name) if info.isfile() else None
            if m:
                samples.setdefault(m.group(1), {})[m.group(2).lower()] = (info.offset_data, info.size)
    return [(path, members) for members in samples.values() if any(k in members for k in IMAGE_KEYS)]


def batches(loader: Any) -> Iterator[tuple[int, int]]:
    """(samples, tokens) per batch of a loader yielding padded batches."""
    for batch in loader:
        yield int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())
