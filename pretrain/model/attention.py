"""Which attention implementation the decoder and the vision tower run, and the masks it gets.

`model.attn_implementation` names the decoder's: that is where masks matter (padding, and packed rows whose samples
must not see each other). The vision tower never has a mask (every image is a full square of patches): sdpa is as
fast as it gets there (on CUDA it dispatches to the flash kernel itself). It follows the decoder for `eager`
(debugging) and `flash_attention_2`, and stays on sdpa for `flex_attention`, which would compile a kernel per distinct
image count (text-only samples make that count vary) for no gain.

Masks come from the host: every batch carries `sample_lengths`, so the sample boundaries are known before anything
reaches the device, and `attention_inputs` turns them into what each implementation takes without reading a device
value back (transformers would otherwise re-derive the boundaries from the position ids, with host syncs, and for
flash_attention_2 in every layer):
- flash_attention_2: `cu_seq_lens_q/k` + `max_length_q/k` (Python ints) over all rows laid end to end: its varlen
  path then reads nothing back in the layers. transformers still syncs once per decoder forward there: with no
  attention mask and position ids given, `create_causal_mask` checks the position ids for packed sequences
  (masking_utils.find_packed_sequence_indices: `(packed_sequence_mask[:, -1] == 0).all()` read as a bool, one
  `aten::_local_scalar_dense`), once per micro-batch, not per layer (tests/model/test_model_unit.py counts it);
- flex_attention: a BlockMask from per-token document ids (no dense mask is ever built);
- sdpa / eager: a 4-D mask built on the device from the same ids (transformers takes a 4-D mask as it is);
- rows that are one full sample each (no padding, no packing): no mask at all, plain causal attention.
A padded row's tail is one more segment (its labels are ignored), so padded and packed batches take the same path;
tests/model/test_model_unit.py checks packed against unpacked per-sample losses for every implementation that runs on
CPU.

`auto`: flash_attention_2 when CUDA is there, training runs in bf16 (FA2 has no fp32 kernels) and the flash-attn
CUDA extension really imports and runs a tiny call (a wheel built for another torch or CUDA imports fine by name and
fails at load time); on CUDA without it, flex_attention for packed rows (data.packing) and sdpa for padded ones;
sdpa on the CPU. The reason for the choice is logged. On CUDA sdpa's dense (B, 1, L, L) mask for packed rows rules
out its flash kernel; flex_attention's block mask does not. transformers compiles flex_attention once with
`torch.compile(flex_attention)`, i.e. dynamic=None (integrations/flex_attention.py; dynamic=False only under torch
2.6 in training): the first row width compiles a static kernel, a new width recompiles (dynamo then tries a kernel
dynamic in that size), each compilation costs seconds to minutes, and past dynamo's recompile limit it runs the slow
eager path. So under flex the loader pads every batch to one of FLEX_WIDTHS widths (`flex_row_widths`): packed rows
are nearly full anyway (an explicit flex choice for padded rows pays up to a quarter of data.max_length of padding
per row), and benchmarks report the median step beside the mean.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
from dataclasses import dataclass

import torch

from pretrain.config import ConfigError

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
# Distinct row widths under flex_attention: fewer than dynamo's recompile limit (8), with room for a partial batch.
FLEX_WIDTHS = 4


@dataclass(frozen=True)
class AttentionChoice:
    decoder: str
    vision: str

    def as_hf(self) -> dict[str, str]:
        """The per-sub-config form `from_pretrained(attn_implementation=...)` takes for a Llava model."""
        return {"": self.decoder, "text_config": self.decoder, "vision_config": self.vision}


@functools.cache
def flash_attn_works(device: str = "cuda") -> tuple[bool, str]:
    """Whether flash-attn imports and runs one tiny causal call on `device`; (False, why) otherwise."""
    try:
        flash_attn = importlib.import_module("flash_attn")
    except Exception as err:  # ImportError, or an OSError/RuntimeError from a mismatched compiled extension
        return False, f"flash-attn does not import ({type(err).__name__}: {err})"
    try:
        q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16)  # (batch, tokens, heads, head dim)
        out = flash_attn.flash_attn_func(q, q, q, causal=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if tuple(out.shape) != tuple(q.shape):
            return False, f"flash-attn returned shape {tuple(out.shape)} for {tuple(q.shape)}"
    except Exception as err:
        return False, f"flash-attn imports but its kernel fails ({type(err).__name__}: {err})"
    return True, f"flash-attn {getattr(flash_attn, '__version__', '?')} runs"


def flex_attention_available() -> bool:
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError:
        return False
    return True


def resolve_attention(requested: str, *, half_precision: bool, cuda: bool | None = None,
                      probe_device: str = "cuda", packing: bool = False) -> AttentionChoice:
    """Turn `model.attn_implementation` into what the decoder and the tower run; ConfigError when it cannot run.
    `probe_device`: where flash-attn's tiny call runs (tests run it on the CPU with stand-in modules)."""
    if requested not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={requested!r} (valid: {', '.join(IMPLEMENTATIONS)})")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        requested, why = _auto(cuda, half_precision, probe_device, packing)
        log.info("model.attn_implementation=auto -> %s: %s", requested, why)
    if requested == "flash_attention_2":
        _check_flash(cuda, half_precision, probe_device)
        return AttentionChoice("flash_attention_2", "flash_attention_2")
    if requested == "flex_attention":
        if not flex_attention_available():
            raise ConfigError(f"model.attn_implementation=flex_attention needs torch>=2.5 (have {torch.__version__})")
        return AttentionChoice("flex_attention", "sdpa")
    return AttentionChoice(requested, requested)


def _auto(cuda: bool, half_precision: bool, probe_device: str, packing: bool) -> tuple[str, str]:
    if not cuda:
        return "sdpa", "no CUDA device"
    if half_precision:
        works, why = flash_attn_works(probe_device)
        if works:
            return "flash_attention_2", why
    else:
        why = "flash-attn has no fp32 kernels"
    if not packing:  # a padding mask only: sdpa keeps an efficient kernel, and rows keep their own widths
        return "sdpa", f"{why}; rows are not packed"
    if not flex_attention_available():
        return "sdpa", f"{why}; no flex_attention in torch {torch.__version__}"
    # Packed rows: flex's block mask skips the blocks across samples where sdpa would take a dense mask (and lose
    # its flash kernel); the loader keeps the row widths to a few (flex_row_widths) so it compiles a few kernels.
    return "flex_attention", f"{why}; packed rows: flex_attention with block masks from the sample boundaries"


def flex_row_widths(max_length: int, multiple: int = 8) -> tuple[int, ...]:
    """The row widths a loader pads to under flex_attention: FLEX_WIDTHS steps up to `max_length`, each a multiple
    of `multiple`."""
    def up(n: int) -> int:
        return -(-n // multiple) * multiple

    return tuple(sorted({up(-(-max_length * k // FLEX_WIDTHS)) for k in range(1, FLEX_WIDTHS + 1)}))


def _check_flash(cuda: bool, half_precision: bool, probe_device: str) -> None:
    if not cuda:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa (or auto)")
    if not half_precision:
        raise ConfigError("model.attn_implementation=flash_attention_2 has no fp32 kernels: set train.precision=bf16 "
                          "or use sdpa")
    works, why = flash_attn_works(probe_device)
    if not works:
        raise ConfigError(f"model.attn_implementation=flash_attention_2: {why} (pip install -e '.[gpu]' for this "
                          "torch and CUDA); use sdpa (or auto)")


# -- masks from host-known sample boundaries ----------------------------------------------------------------------
def row_segments(sample_lengths: list[list[int]], width: int) -> list[list[int]]:
    """Each row's segments: its samples, then its pad tail (when there is one) as one more segment."""
    rows = []
    for lengths in sample_lengths:
        used = sum(lengths)
        if used > width or min(lengths, default=1) < 1:
            raise ValueError(f"sample_lengths {lengths} do not fit a row of {width} tokens")
        rows.append(list(lengths) + ([width - used] if used < width else []))
    return rows


def flash_varlen_kwargs(segments: list[list[int]], device: torch.device) -> dict:
    """transformers' flash_attention_2 varlen kwargs for all rows laid end to end (it flattens (B, L) to B*L):
    with them it neither unpads from a mask nor derives boundaries from position ids (a sync per layer)."""
    flat = [n for row in segments for n in row]
    cu = torch.tensor([0, *itertools.accumulate(flat)], dtype=torch.int32).to(device, non_blocking=True)
    longest = max(flat)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}



def document_ids(segments: list[list[int]], device: torch.device) -> torch.Tensor:
    """(rows, width) id of the segment every token belongs to, built on the host and copied without a sync."""
    ids = [[i for i, n in enumerate(row) for _ in range(n)] for row in segments]
    return torch.tensor(ids, dtype=torch.int32).to(device, non_blocking=True)


def flex_block_mask(segments: list[list[int]], device: torch.device):
    """A BlockMask for causal attention within each segment: flex_attention skips the blocks that cross samples."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids(segments, device)
    width = docs.shape[1]

    def same_document_causal(b, h, q, kv):
        return (docs[b, q] == docs[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, docs.shape[0], None, width, width, device=device)


def dense_document_mask(segments: list[list[int]], device: torch.device, dtype: torch.dtype,
                        boolean: bool) -> torch.Tensor:
    """(rows, 1, width, width) causal mask within segments: bool for sdpa (True attends), additive for eager."""
    docs = document_ids(segments, device)
    pos = torch.arange(docs.shape[1], device=device)
    keep = (docs[:, None, :, None] == docs[:, None, None, :]) & (pos[:, None] >= pos[None, :])
    if boolean:
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def attention_inputs(impl: str, sample_lengths: list[list[int]], embeds: torch.Tensor,
                     position_ids: torch.Tensor | None, shortcut: bool = True) -> dict:
    """The decoder's mask arguments for rows of host-known samples (see the module docstring). `shortcut=False`
    gives a mask even for one full sample per row (with neither mask nor position ids, transformers looks for
    packed sequences in its default position ids, a read back)."""
    rows, width = embeds.shape[:2]
    if len(sample_lengths) != rows:
        raise ValueError(f"sample_lengths has {len(sample_lengths)} rows for a batch of {rows}")
    segments = row_segments(sample_lengths, width)
    if shortcut and all(len(row) == 1 for row in segments):
        # One full sample per row: plain causal attention. No all-ones mask and no position ids, whose checks in
        # transformers read device values back; the default positions are the same 0..width-1.
        return {"attention_mask": None, "position_ids": None}
    device = embeds.device
    if impl == "flash_attention_2":
        return {"attention_mask": None, "position_ids": position_ids, **flash_varlen_kwargs(segments, device)}
    if impl == "flex_attention":
        return {"attention_mask": flex_block_mask(segments, device), "position_ids": position_ids}
    mask = dense_document_mask(segments, device, embeds.dtype, boolean=impl != "eager")
    return {"attention_mask": mask, "position_ids": position_ids}


def decode_rows(decoder: torch.nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor | None,
                sample_lengths: list[list[int]]) -> torch.Tensor:
    """The decoder's last hidden states for a padded or packed micro-batch, its masks from the host-known
    `sample_lengths` (every collated batch has them; see attention_inputs)."""
    inputs = attention_inputs(decoder.config._attn_implementation, sample_lengths, embeds, position_ids)
    return decoder(inputs_embeds=embeds, use_cache=False, **inputs).last_hidden_state
