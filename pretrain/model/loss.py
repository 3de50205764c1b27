"""Next-token cross-entropy over a large vocabulary: the LM head and the loss fused, chunked over label rows.

Memory. `F.cross_entropy(lm_head(h).float(), t)` keeps the fp32 logits of every label row for backward:
rows x vocabulary x 4 bytes (16k label tokens x 152k vocabulary: ~10 GB per micro-batch), and a loop over chunks of
rows keeps them all the same. `LinearCrossEntropy` saves only its inputs and one fp32 log-sum-exp per row; logits
exist for `chunk` rows at a time, in forward and again (recomputed) in backward, so the loss adds O(chunk x
vocabulary) whatever the label count. The price is the head's matmul run twice, as activation checkpointing would.
The head's gradient sums over chunks in fp32 (one vocabulary x hidden fp32 buffer in backward), cast once to the
weight's precision: a bf16 running sum would round at every chunk.

ZeRO-3 lockstep. Under ZeRO-3 every call of a module gathers its parameters: a collective every rank must issue the
same number of times in the same order. The head is called exactly once per forward whatever the label count (none
included): the chunk loop runs inside that one call, on the gathered weight, and calls no module. Why not a fixed
number of per-chunk head calls padded with empty chunks (also lockstep-safe): each call re-gathers the whole head,
152k x 4096 in bf16 is 1.2 GB, once per chunk in forward and twice per chunk in backward (recompute + gradient);
one call gathers it once each way, like a plain forward.

Not liger-kernel's fused linear cross-entropy: it counts the non-ignored targets with `.item()` (a host sync per
micro-batch, which the step avoids) and computes the head's gradient during forward, holding a full vocabulary x
hidden gradient from forward to backward on every rank. This function is plain torch (CPU and CUDA alike) and is
tested equal to the plain loss, value and gradients (tests/model/test_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LOSS_CHUNK = 1024  # label rows whose fp32 logits exist at once (what pretrain.plan assumes)


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    return (slice(start, min(start + chunk, n)) for start in range(0, n, chunk))


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) with fp32 logits, `chunk` rows at a time, recomputed in
    backward. Every target must be a real class (callers select the label rows first)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                chunk: int) -> torch.Tensor:
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows in _chunks(hidden.shape[0], chunk):
            logits = F.linear(hidden[rows], weight, bias).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            total += (lse[rows] - logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1)).sum()
        ctx.save_for_backward(hidden, targets, weight, bias, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, targets, weight, bias, lse = ctx.saved_tensors
        need_hidden, _, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The head's gradients sum over every chunk: accumulated in fp32 and cast once at the end. In bf16 (8
        # significant bits) each chunk's addition rounds the running sum, and at a large vocabulary the error of
        # many chunks shows (tests/model/test_loss.py).
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for rows in _chunks(hidden.shape[0], ctx.chunk):
            h, t = hidden[rows], targets[rows]
            # d loss / d logits = softmax - one_hot(target), in place on the recomputed fp32 logits.
            d = F.linear(h, weight, bias).float().sub_(lse[rows].unsqueeze(1)).exp_()
            d.scatter_add_(1, t.unsqueeze(1), torch.full_like(t, -1, dtype=d.dtype).unsqueeze(1))
            d = d.mul_(grad).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = d @ weight
            if grad_weight is not None and h.dtype == torch.float32:
                grad_weight.addmm_(d.T, h)
            elif grad_weight is not None:  # one chunk's product in the inputs' precision, summed in fp32
                grad_weight += (d.T @ h).float()
            if grad_bias is not None:
                grad_bias += d.sum(0, dtype=torch.float32)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, None, grad_weight, grad_bias, None


def linear_cross_entropy(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (rows, hidden) against `targets` (rows,), in one call of `head`."""

    def fused(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # reads head.weight while it is gathered
        return LinearCrossEntropy.apply(h, t, head.weight, head.bias, chunk)

    return call_as_forward(head, fused, hidden, targets)


def call_as_forward(module: nn.Module, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """`fn(*args)` run as `module`'s forward, through `module(...)`: the module's hooks wrap it exactly as they wrap
    a plain call (under ZeRO-3: gather the parameters before, release them after, and the backward hooks on the
    tensor inputs and the output that gather them again for the gradient)."""
    own = module.__dict__.get("forward")  # an instance-level forward someone else set, put back after
    module.forward = fn  # an instance attribute shadows the class's forward, for this call only
    try:
        return module(*args)
    finally:
        del module.forward
        if own is not None:
            module.forward = own
