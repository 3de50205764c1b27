"""Frozen weights read from where the run took them, for checkpoints that lack them (or hold them only in 16 bits).

A run builds its model from `model.init_from` (a Llava directory) or from `model.llm` + `model.vision` (each a local
directory or a cached hub id); build.py assembles the decoder's `model.*` as Llava's `model.language_model.*`, its
`lm_head.*` as `lm_head.*`, and the tower as `model.vision_tower.*`. Source file keys are mapped to in-memory names
with transformers' own load-time conversion mapping for the component class (legacy names, `vision_model.` prefixes
of two-tower checkpoints), then to Llava names by that assembly. Safetensors only; tensors are read in row chunks
through `safe_open` slices and files are closed (unmapped) after every `release_bytes` read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key

from pretrain.config import ModelConfig
from pretrain.export.safetensors_stream import DTYPE_CODES
from pretrain.model.components import load_component_config

log = logging.getLogger(__name__)

RELEASE_BYTES = 256 << 20
CHUNK_BYTES = 32 << 20


def resolve_dir(spec: str) -> Path:
    """A local directory, or a hub id already in the local cache (never downloads)."""
    if Path(spec).is_dir():
        return Path(spec)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # noqa: BLE001  (hub errors have many types; the message says what was looked for)
        raise FileNotFoundError(f"{spec}: not a local directory nor a cached hub model ({err})") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """Safetensors key -> file, from the index or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: no model.safetensors(.index.json) (pickled weights are not read)")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _component_keys(directory: Path, model_cls: type, config, to_llava: Callable[[str], str]) -> dict[str, tuple]:
    """Llava in-memory name -> (file, key) for one source directory."""
    with torch.device("meta"):
        model = model_cls(config)
    meta = model.state_dict()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found = {}
    for key, file in weight_files(directory).items():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is None and name in meta:  # tensors a converter merges or splits are not read one by one
            found[to_llava(name)] = (file, key)
    return found


def _llm_to_llava(name: str) -> str:
    # build.py: model.model.language_model = decoder.model; model.lm_head = decoder.lm_head
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


class SourceWeights:
    """Llava-named tensors available from the run's sources: `shape(name)` (None if absent), `pieces(name)`."""

    def __init__(self, mcfg: ModelConfig, release_bytes: int = RELEASE_BYTES, chunk_bytes: int = CHUNK_BYTES):
        self.release_bytes, self.chunk_bytes = release_bytes, chunk_bytes
        self.keys: dict[str, tuple[Path, str]] = {}
        if mcfg.init_from:
            d = resolve_dir(mcfg.init_from)
            self.keys.update(_component_keys(d, LlavaForConditionalGeneration, LlavaConfig.from_pretrained(d),
                                             lambda n: n))
        else:
            if isinstance(mcfg.llm, str):
                cfg = load_component_config(mcfg.llm, vision=False)
                self.keys.update(_component_keys(resolve_dir(mcfg.llm), AutoModelForCausalLM._model_mapping[type(cfg)],
                                                 cfg, _llm_to_llava))
            if isinstance(mcfg.vision, str):
                cfg = load_component_config(mcfg.vision, vision=True)
                self.keys.update(_component_keys(resolve_dir(mcfg.vision), AutoModel._model_mapping[type(cfg)], cfg,
                                                 lambda n: "model.vision_tower." + n))
        self._open: dict[Path, object] = {}
        self._resident = 0

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.keys:
            return None
        file, key = self.keys[name]
        return tuple(self._file(file).get_slice(key).get_shape())

    def pieces(self, name: str) -> Iterator[torch.Tensor]:
        file, key = self.keys[name]
        shape = self.shape(name)
        if len(shape) == 0:
            yield self._file(file).get_tensor(key).reshape(-1)
            return
        row_bytes = max(1, int(torch.Size(shape[1:]).numel()) * self._dtype(file, key).itemsize)
        rows = max(1, self.chunk_bytes // row_bytes)
        for start in range(0, shape[0], rows):
            piece = self._file(file).get_slice(key)[start : start + rows].reshape(-1)
            self._resident += piece.nbytes
            if self._resident >= self.release_bytes:
                self.release()
            yield piece

    def _dtype(self, file: Path, key: str) -> torch.dtype:
        code = self._file(file).get_slice(key).get_dtype()
        return next(dtype for dtype, c in DTYPE_CODES.items() if c == code)

    def _file(self, file: Path):
        if file not in self._open:
            self._open[file] = safe_open(file, "pt")
        return self._open[file]

    def release(self) -> None:
        self._open.clear()
        self._resident = 0
