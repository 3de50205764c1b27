"""Which attention implementation the decoder and the vision tower run.

`model.attn_implementation` names the decoder's: that is where masks matter (padding, and packed rows whose samples
must not see each other). transformers derives the packed-row mask from position ids that restart at 0 when no
attention mask is given, for sdpa, eager and flex_attention (masking_utils.find_packed_sequence_indices), and
flash_attention_2 takes the same restarts as varlen boundaries; tests/test_model_unit.py checks packed against
unpacked losses for every implementation that runs on CPU.

The vision tower never has a mask (every image is a full square of patches): sdpa is as fast as it gets there (on
CUDA it dispatches to the flash kernel itself). It follows the decoder for `eager` (debugging) and
`flash_attention_2`, and stays on sdpa for `flex_attention`, which would compile a kernel per distinct image count
(text-only samples make that count vary) for no gain.

`auto`: flash_attention_2 when CUDA is there, the flash-attn package imports and training runs in bf16 (FA2 has no
fp32 kernels); sdpa otherwise.

flash_attention_2 and packing: transformers finds the varlen boundaries from position ids only in a one-row batch;
`decode_rows` lays a multi-row packed batch end to end for it (one_row_for_packing).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from pretrain.config import ConfigError

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass(frozen=True)
class AttentionChoice:
    decoder: str
    vision: str

    def as_hf(self) -> dict[str, str]:
        """The per-sub-config form `from_pretrained(attn_implementation=...)` takes for a Llava model."""
        return {"": self.decoder, "text_config": self.decoder, "vision_config": self.vision}


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_attention(requested: str, *, half_precision: bool, cuda: bool | None = None) -> AttentionChoice:
    """Turn `model.attn_implementation` into what the decoder and the tower run; ConfigError when it cannot run."""
    if requested not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={requested!r} (valid: {', '.join(IMPLEMENTATIONS)})")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        fast = cuda and half_precision and flash_attn_installed()
        requested = "flash_attention_2" if fast else "sdpa"
    if requested == "flash_attention_2":
        _check_flash(cuda, half_precision)
        return AttentionChoice("flash_attention_2", "flash_attention_2")
    if requested == "flex_attention":
        if not flex_attention_available():
            raise ConfigError(f"model.attn_implementation=flex_attention needs torch>=2.5 (have {torch.__version__})")
        return AttentionChoice("flex_attention", "sdpa")
    return AttentionChoice(requested, requested)


def _check_flash(cuda: bool, half_precision: bool) -> None:
    if not cuda:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa (or auto)")
    if not half_precision:
        raise ConfigError("model.attn_implementation=flash_attention_2 has no fp32 kernels: set train.precision=bf16 "
                          "or use sdpa")
    if not flash_attn_installed():
        raise ConfigError("model.attn_implementation=flash_attention_2: the flash-attn package is not installed "
                          "(pip install -e '.[gpu]'); use sdpa (or auto)")


def one_row_for_packing(impl: str, packed: bool, rows: int) -> bool:
    """transformers' flash_attention_2 reads sample boundaries from restarting position ids only in a batch of one
    row (modeling_flash_attention_utils._is_packed_sequence); with more rows it would attend across the samples of a
    row. Such batches go through the decoder as one long row: every row starts at position 0, so rows stay apart
    as well. sdpa, eager and flex_attention build a per-row mask and need none of this."""
    return packed and impl == "flash_attention_2" and rows > 1


def decode_rows(decoder: torch.nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, packed: bool, one_row: bool | None = None) -> torch.Tensor:
    """The decoder's last hidden states for a padded or packed micro-batch. Packed rows carry no attention mask:
    the per-sample causal mask comes from the restarting position ids (see the module docstring)."""
    if one_row is None:
        one_row = one_row_for_packing(decoder.config._attn_implementation, packed, embeds.shape[0])
    if one_row:
        b, t = embeds.shape[:2]
        out = decoder(inputs_embeds=embeds.reshape(1, b * t, -1), attention_mask=None,
                      position_ids=position_ids.reshape(1, b * t), use_cache=False)
        return out.last_hidden_state.reshape(b, t, -1)
    out = decoder(inputs_embeds=embeds, attention_mask=None if packed else attention_mask, position_ids=position_ids,
                  use_cache=False)
    return out.last_hidden_state
