"""Memory and time of the LM-head loss over label rows: the earlier loop of one head call per chunk vs the fused,
chunked head + cross-entropy (pretrain.model.loss). fp32, one process, forward + backward. The driver is
tools/bench_loss.py.

Saved bytes: what autograd keeps from forward to backward (saved-tensor hooks), the head's own parameters left out
(both keep a reference to them). Largest tensor: the biggest output of any op in forward and backward (CPU has no
allocator statistic; with the saved bytes it bounds the loss's peak).
tests/model/test_loss.py asserts on the same figures.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.model.loss import linear_cross_entropy


def per_chunk_head_calls(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """The loss before the fused head: one head call (under ZeRO-3 a gather) per chunk of label rows."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


def fused(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    return linear_cross_entropy(head, hidden, targets, chunk)


class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else [out]:
            if isinstance(o, torch.Tensor):
                self.bytes = max(self.bytes, o.numel() * o.element_size())
        return out


def loss_memory(loss_fn, head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> dict[str, float]:
    """{saved, largest} bytes of one forward + backward of `loss_fn`."""
    params = {id(p) for p in head.parameters()}
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in params:
            saved.append(x.numel() * x.element_size())
        return x

    hidden = hidden.detach().requires_grad_()
    with LargestTensor() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = loss_fn(head, hidden, targets, chunk)
        loss.backward()
    return {"saved": sum(saved), "largest": largest.bytes}


def seconds(loss_fn, head, hidden, targets, chunk: int, repeats: int = 3) -> float:
    """Median wall time of forward + backward."""
    times = []
    for _ in range(repeats):
        h = hidden.detach().requires_grad_()
        start = time.perf_counter()
        loss_fn(head, h, targets, chunk).backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
