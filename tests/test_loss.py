"""The fused, chunked LM head + cross-entropy: equal to the plain loss (value and gradients, fp32) on both sides of
the chunk boundary, one head call whatever the label count, memory O(chunk x vocabulary) in forward and backward
(saved-tensor bytes and the largest tensor made), and a training forward without host syncs of its own."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import ModelConfig, ObjectivesConfig
from pretrain.data.batching import collate
from pretrain.data.sample import ProcessedSample
from pretrain.data.text import TextProcessor
from pretrain.model.build import build_model
from pretrain.model.loss import linear_cross_entropy
from pretrain.model.stages import apply_stage
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES
from pretrain.model.vlm import VLMForTraining

PRETRAIN = str(Path(__file__).resolve().parents[1] / "pretrain")
# Ops that read a device value back to the host (or need to, for their output shape).
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
            "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave", "aten::item"}


def _head(hidden: int, vocab: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(hidden, vocab, bias=bias)


def _plain(head, h, t) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def _per_chunk_head_calls(head, h, t, chunk) -> torch.Tensor:
    """The loss before the fused head: one head call (a ZeRO-3 gather) per chunk of label rows."""
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + F.cross_entropy(head(h[start : start + chunk]).float(), t[start : start + chunk],
                                        reduction="sum")
    return total


def _grads(fn, head, h, t) -> tuple[torch.Tensor, list[torch.Tensor]]:
    head.zero_grad()
    h = h.detach().requires_grad_()
    loss = fn(head, h, t)
    (loss * 0.5).backward()  # a non-unit upstream gradient
    return loss.detach(), [h.grad, *(p.grad for p in head.parameters())]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_equals_plain_loss_and_calls_the_head_once(bias):
    chunk = 8
    head = _head(16, 50, bias)
    calls = []
    head.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    for rows in (0, 5, chunk, 13, 3 * chunk + 1):  # none, below, at and above the chunk boundary
        h, t = torch.randn(rows, 16), torch.randint(0, 50, (rows,))
        want, want_grads = _grads(_plain, head, h, t)
        calls.clear()
        got, got_grads = _grads(lambda m, x, y: linear_cross_entropy(m, x, y, chunk), head, h, t)
        assert len(calls) == 1, rows  # forward; the backward recomputes on the saved weight, not through the head
        assert "forward" not in head.__dict__
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        if rows:
            assert want_grads[1].abs().sum() > 0  # the comparison is not between zeros


class _Bytes(TorchDispatchMode):
    """The largest tensor any op makes (a peak proxy on CPU, where there is no allocator statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


def _memory(fn, head, h, t) -> tuple[int, int]:
    """(bytes saved for backward other than the head's own parameters, largest tensor made in forward+backward)."""
    params = {id(p) for p in head.parameters()}
    saved = []

    def pack(x):
        if id(x) not in params:
            saved.append(x.numel() * x.element_size())
        return x

    h = h.detach().requires_grad_()
    with _Bytes() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn(head, h, t)
        loss.backward()
    return sum(saved), largest.largest


def test_loss_memory_is_chunk_by_vocabulary_not_labels_by_vocabulary():
    vocab, hidden, chunk, rows = 50_000, 32, 128, 1024
    head = _head(hidden, vocab, bias=False)
    h, t = torch.randn(rows, hidden), torch.randint(0, vocab, (rows,))
    old_saved, old_largest = _memory(lambda m, x, y: _per_chunk_head_calls(m, x, y, chunk), head, h, t)
    saved, largest = _memory(lambda m, x, y: linear_cross_entropy(m, x, y, chunk), head, h, t)
    all_logits = rows * vocab * 4
    assert old_saved >= all_logits  # the measurement sees what the old loop kept: every chunk's fp32 logits
    # The fused loss keeps its inputs and one fp32 log-sum-exp per row: nothing of vocabulary size.
    assert saved <= rows * (hidden * 4 + 8 + 4) + 1024, saved
    # Nothing it makes, forward or backward, exceeds one chunk's fp32 logits or the head's own gradient.
    assert largest <= max(chunk * vocab * 4, vocab * hidden * 4), largest
    assert largest < all_logits / 4 and old_largest >= chunk * vocab * 4


# -- the training forward -----------------------------------------------------------------------------------------
class SyncCounter(TorchDispatchMode):
    """Synchronising ops, each with the innermost caller outside torch: ours (pretrain/) or a library's."""

    def __init__(self) -> None:
        super().__init__()
        self.ours: list[str] = []
        self.theirs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []))
        if name in SYNC_OPS or bool_index:
            where = _caller()
            (self.ours if where.startswith(PRETRAIN) else self.theirs).append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    torch_dir = str(Path(torch.__file__).parent)
    for frame in reversed(traceback.extract_stack()[:-3]):  # past _caller and __torch_dispatch__
        if not frame.filename.startswith(torch_dir):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _batch(model, tokenizer) -> dict:
    """Two captioned images and a text-only conversation, padded rows."""
    cfg = model.config
    text = TextProcessor(tokenizer, cfg.image_token_id, cfg.image_seq_length, max_length=256)
    size = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    a = text.caption("two red circles on the left of a blue square.")
    b = text.conversation([{"from": "human", "value": "say hello"}, {"from": "gpt", "value": "hello there"}], False)
    c = text.caption("a green triangle.")
    samples = [ProcessedSample(a.input_ids, a.labels, torch.randn(3, size, size, generator=g)),
               ProcessedSample(b.input_ids, b.labels, None),
               ProcessedSample(c.input_ids, c.labels, torch.randn(3, size, size, generator=g))]
    return collate([[s] for s in samples], tokenizer.pad_token_id)


def test_training_forward_makes_no_host_sync_of_its_own(tokenizer):
    """The training forward with the contrastive objective, chunk boundary crossed: no synchronising op called from
    pretrain/ (transformers' own mask checks are counted apart), the label count comes from the host batch, and the
    loss equals the plain per-token loss."""
    mcfg = ModelConfig(llm=dict(DECODER_SHAPES["llama"]), vision=dict(VISION_SHAPES["clip"]))
    model = build_model(mcfg, tokenizer)
    apply_stage(model, "full")
    wrapper = VLMForTraining(model, ObjectivesConfig(contrastive_weight=0.5)).train()
    batch = _batch(model, tokenizer)
    wrapper.loss_chunk = 7
    assert batch["n_labels"] > wrapper.loss_chunk
    with SyncCounter() as syncs:
        loss, n = wrapper(batch)
        loss.backward()
    assert syncs.ours == [], syncs.ours
    assert n.device.type == "cpu" and int(n) == batch["n_labels"] == int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        want = wrapper.per_token_loss(batch).sum()
    torch.testing.assert_close(wrapper.last_losses["caption"] * int(n), want, rtol=1e-5, atol=1e-5)
    # The counter sees a sync where there is one: the old device-side image-token check.
    with SyncCounter() as probe:
        ids = batch["input_ids"]
        bool((ids == model.config.image_token_id).sum() != 0)
        ids[ids > 0]
    assert len(probe.ours) == 0 and len(probe.theirs) == 2
