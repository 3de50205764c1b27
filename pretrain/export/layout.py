"""What an exported LlavaForConditionalGeneration directory holds, as transformers itself defines it.

A model built on the meta device (no memory) gives every tensor's in-memory name and shape; transformers' own
save-time functions then say which tied duplicates `save_pretrained` drops (`remove_tied_weights_from_state_dict`)
and which on-disk names it writes (`revert_weight_conversion`, the reverse of the load-time conversion mapping, e.g.
`model.language_model.*` -> `language_model.model.*`). No key table is written here, so the export follows whatever
transformers version is installed, and loads back with no missing or unexpected keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict


@dataclass(frozen=True)
class ExportTensor:
    name: str  # in-memory name (LlavaForConditionalGeneration.state_dict())
    disk_name: str  # the name save_pretrained writes
    shape: tuple[int, ...]
    floating: bool
    dtype: torch.dtype  # the model's dtype for it (used as is for non-floating buffers)


@dataclass(frozen=True)
class ExportLayout:
    tensors: list[ExportTensor]
    tied: dict[str, str]  # dropped duplicate -> the kept name that holds its data
    n_parameters: int  # unique parameters, what save_pretrained records as total_parameters
    model: LlavaForConditionalGeneration  # the meta-device model (config, generation config)


def meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """Llava, or LlavaNext for an AnyRes config."""
    from pretrain.model.build import model_class

    with torch.device("meta"):
        return model_class(config)(config)


def export_layout(config: LlavaConfig) -> ExportLayout:
    model = meta_model(config)
    state = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    on_disk = revert_weight_conversion(model, dict(kept))
    name_of = {id(t): name for name, t in kept.items()}
    if len(on_disk) != len(kept) or any(id(t) not in name_of for t in on_disk.values()):
        # A WeightConverter (merging or splitting tensors) would need the data; Llava's mapping only renames.
        raise NotImplementedError("the on-disk format of this model is not a pure renaming of its parameters")
    tensors = [ExportTensor(name_of[id(t)], disk, tuple(t.shape), t.is_floating_point(), t.dtype)
               for disk, t in on_disk.items()]
    return ExportLayout(tensors, _tied_sources(model, set(state) - set(kept)),
                        sum(p.numel() for p in model.parameters()), model)


def _tied_sources(model: LlavaForConditionalGeneration, dropped: set[str]) -> dict[str, str]:
    """For each dropped name, the kept name sharing its Parameter object (tie_weights makes them one object)."""
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    tied = {}
    for names in holders.values():
        keep = [n for n in names if n not in dropped]
        for n in names:
            if n in dropped and keep:
                tied[n] = keep[0]
    missing = dropped - set(tied)
    if missing:
        raise RuntimeError(f"tied weights without a kept partner: {sorted(missing)}")
    return tied
