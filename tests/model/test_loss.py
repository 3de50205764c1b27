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

from pretrain.bench import loss as bench_loss
from pretrain.bench.device_check import per_token_loss
from pretrain.config import ModelConfig, ObjectivesConfig
from pretrain.data.batching import collate
from pretrain.data.sample import ProcessedSample
from pretrain.data.text import TextProcessor
from pretrain.model.build import build_model
from pretrain.model.loss import linear_cross_entropy
from pretrain.model.stages import apply_stage
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES
from pretrain.model.vlm import VLMForTraining

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "pretrain")
# Ops that read a device value back to the host (or need to, for their output shape).
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
            "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave", "aten::item"}





def _head(hidden: int, vocab: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(hidden, vocab, bias=bias)


def _plain(head, h, t) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


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


def test_loss_memory_is_chunk_by_vocabulary_not_labels_by_vocabulary():
    """The figures of tools/bench_loss.py (pretrain.bench.loss) at test size: the earlier per-chunk loop kept every
    chunk's fp32 logits."""
    vocab, hidden, chunk, rows = 50_000, 32, 128, 1024
    head = _head(hidden, vocab, bias=False)
    h, t = torch.randn(rows, hidden), torch.randint(0, vocab, (rows,))
    old = bench_loss.loss_memory(bench_loss.per_chunk_head_calls, head, h, t, chunk)
    new = bench_loss.loss_memory(bench_loss.fused, head, h, t, chunk)
    all_logits = rows * vocab * 4
    assert old["saved"] >= all_logits  # the measurement sees what the old loop kept
    # The fused loss keeps its inputs and one fp32 log-sum-exp per row: nothing of vocabulary size.
    assert new["saved"] <= rows * (hidden * 4 + 8 + 4) + 1024, new
    # Nothing it makes, forward or backward, exceeds one chunk's fp32 logits or the head's own gradient.
    assert new["largest"] <= max(chunk * vocab * 4, vocab * hidden * 4), new
    assert new["largest"] < all_logits / 4 and old["largest"] >= chunk * vocab * 4


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
        want = per_token_loss(wrapper, batch).sum()
    torch.testing.assert_close(wrapper.last_losses["caption"] * int(n), want, rtol=1e-5, atol=1e-5)
    # The counter sees a sync where there is one: the old device-side image-token check.
    with SyncCounter() as probe:
        ids = batch["input_ids"]
        bool((ids == model.config.image_token_id).sum() != 0)
        ids[ids > 0]
    assert len(probe.ours) == 0 and len(probe.theirs) == 2


def test_bf16_head_gradient_is_summed_in_fp32_over_chunks():
    """At a real vocabulary the head's gradient sums many chunks: summed in bf16 (8 significant bits) every chunk's
    addition rounds the running sum; summed in fp32 and cast once, it is as close to the fp32 gradient as one
    rounding to bf16 allows."""
    vocab, hidden, rows, chunk = 32_000, 16, 2048, 32  # 64 chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=True).to(torch.bfloat16)
    h = torch.randn(rows, hidden).to(torch.bfloat16)
    t = torch.randint(0, vocab, (rows,))
    frequent = torch.rand(rows) < 0.5  # as in text: a few tokens are half the targets, their rows sum every chunk
    t[frequent] = torch.randint(0, 8, (int(frequent.sum()),))
    got, got_grads = _grads(lambda m, x, y: linear_cross_entropy(m, x, y, chunk), head, h, t)
    exact = _head(hidden, vocab, bias=True)
    with torch.no_grad():
        exact.weight.copy_(head.weight.float())
        exact.bias.copy_(head.bias.float())
    want, want_grads = _grads(_plain, exact, h.float(), t)
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert g.dtype == torch.bfloat16
        relative = float((g.float() - w).norm() / w.norm())
        # One bf16 rounding (2^-9 relative at most per element) gives ~2e-3 here; summed in bf16 the weight's
        # gradient was ~6.5e-3 off.
        assert relative < 4e-3, (name, relative)
