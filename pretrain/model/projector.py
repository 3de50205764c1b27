"""The projector (vision features -> decoder embeddings) and loading one into a model that may be ZeRO-3 partitioned.

Kinds, all exactly transformers' `LlavaMultiModalProjector` (linear_1 -> act -> linear_2), so every export is a plain
`LlavaForConditionalGeneration`:
- `mlp2x_gelu` (LLaVA-1.5): act = GELU.
- `linear` (LLaVA-1.0): act = identity and linear_2 fixed to the identity matrix (zero bias) and never trained, so the
  map is exactly one trained linear layer. The identity layer costs hidden^2 multiply-adds per image token, far below
  the decoder's cost. A model is recognised as `linear` by `projector_hidden_act == "linear"`.
- `mlp3x_gelu` (a deeper MLP): refused at config time (pretrain.config), as transformers' Llava has two layers and a
  third could not be exported without custom modelling code.

`model.projector_from` reads only the projector from a safetensors / PyTorch file or an exported directory (ours, a
public LLaVA-format model, or the original LLaVA repo's stage-1 `mm_projector.bin`) and writes it into the model.
Under ZeRO-3 each parameter is a size-0 shard outside a gather, so a plain `load_state_dict` would silently load
nothing (LLaVA #1619, #736): the values are written inside `GatheredParameters(modifier_rank=0)`, which repartitions
rank 0's full tensors when it exits.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaConfig

from pretrain.config import ConfigError

ACTIVATION = {"mlp2x_gelu": "gelu", "linear": "linear"}
# Names the projector has in the files we read: transformers' (any prefix), and the LLaVA repo's nn.Sequential
# (`mm_projector.0` / `.2`) or single nn.Linear (`mm_projector.weight`, a linear projector).
_KEY = re.compile(r"(?:^|\.)(?:multi_modal_projector\.(?P<hf>linear_[12])|mm_projector(?:\.(?P<seq>\d+))?)"
                  r"\.(?P<kind>weight|bias)$")
_SEQ = {"0": "linear_1", "2": "linear_2", None: "linear_1"}


def is_linear(config: LlavaConfig) -> bool:
    return config.projector_hidden_act == "linear"


def frozen_names(config: LlavaConfig) -> tuple[str, ...]:
    """Projector parameters that never train: the fixed identity layer of a `linear` projector."""
    return ("multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias") if is_linear(config) else ()


def gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full tensors inside, rank 0's writes kept on exit (ZeRO-3); a no-op for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def set_identity(projector: nn.Module) -> None:
    """linear_2 := identity, the second half of a `linear` projector."""
    layer = projector.linear_2
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    with gathered(params), torch.no_grad():
        layer.weight.copy_(torch.eye(layer.weight.shape[0], dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.zero_()


def read_projector_state(source: str | Path) -> dict[str, torch.Tensor]:
    """Projector tensors named `linear_1.weight`, ... from a file or an export directory."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"model.projector_from: {path} does not exist")
    found: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        for key, tensor in _read_matching(file).items():
            m = _KEY.search(key)
            if not m["hf"] and m["seq"] not in _SEQ:
                raise ConfigError(f"model.projector_from: {key} in {file} belongs to a projector deeper than two "
                                  "layers, which transformers' Llava cannot hold")
            layer = m["hf"] or _SEQ[m["seq"]]
            found[f"{layer}.{m['kind']}"] = tensor
    if not found:
        raise ConfigError(f"model.projector_from: no projector weights in {path} (looked for "
                          "`multi_modal_projector.linear_{1,2}.*` and LLaVA's `mm_projector.*`)")
    return found


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return sorted({path / f for k, f in weight_map.items() if _KEY.search(k)})
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise ConfigError(f"model.projector_from: {path} holds no *.safetensors or *.bin weights")
    return files


def _read_matching(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if _KEY.search(k)}
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a config problem worth naming
        raise ConfigError(f"model.projector_from: cannot read {file}: {err}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and _KEY.search(k)}


def load_projector(projector: nn.Module, source: str | Path, linear: bool) -> list[str]:
    """Write the projector weights found at `source` into `projector` (partitioned or not); returns what was loaded.

    A `linear` projector may come with linear_1 alone (LLaVA-1.0's single layer): linear_2 stays the identity."""
    state = read_projector_state(source)
    params = dict(projector.named_parameters())
    required = set(params) - ({"linear_2.weight", "linear_2.bias"} if linear else set())
    if missing := sorted(required - set(state)):
        hint = " (it holds a single linear layer: set model.projector=linear)" if set(state) <= {
            "linear_1.weight", "linear_1.bias"} else ""
        raise ConfigError(f"model.projector_from: {source} lacks {missing}{hint}")
    if extra := sorted(set(state) - set(params)):
        raise ConfigError(f"model.projector_from: {source} has {extra}, which this projector does not")
    for name, tensor in state.items():
        p = params[name]
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        if tuple(tensor.shape) != shape:
            raise ConfigError(f"model.projector_from: {name} is {tuple(tensor.shape)} in {source} but {shape} in the "
                              "model (another vision tower, decoder or vision_feature_layer?)")
    with gathered(list(params.values())), torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return sorted(state)


def projector_activation(kind: str) -> str:
    if kind not in ACTIVATION:
        raise ConfigError(f"model.projector={kind!r} cannot be built (valid: {', '.join(ACTIVATION)})")
    return ACTIVATION[kind]
