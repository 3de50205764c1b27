"""One optimizer step over an accumulation window, and the model FLOPs it did (for MFU).

Loss normalisation: the loss of a step is the sum of token losses over the label tokens of the whole global batch
(all micro-batches of the accumulation window, all ranks) divided by their count, not a mean of per-rank means. The
label count is all-reduced before the window's backward passes, and each micro-batch's summed loss is scaled by
dp x accumulation / count, because DeepSpeed divides by both.

Non-finite losses: the decision is all-reduced so every rank skips alike. With accumulation the bad micro-batch
adds nothing but still passes DeepSpeed's step() to keep its accumulation boundary aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pretrain.data.text import IGNORE
from pretrain.model.flops import VLMShape, peak_flops, step_flops
from pretrain.train import dist
from pretrain.train.faults import Faults


@dataclass
class StepResult:
    loss: float  # nan when the update was skipped
    grad_norm: float | None
    nonfinite: bool
    label_tokens: float  # over the global batch
    lrs: dict[str, float]  # learning rate of each parameter group for this step (before the scheduler moved on)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def label_tokens(batch: dict) -> int:
    """Positions whose next token is a label: where the loss (and the LM head) is computed."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def train_step(engine: Any, batches: list[dict], world: int, device: torch.device, faults: Faults,
               step: int) -> StepResult:
    """Forward/backward over the micro-batches of one step and the optimizer update; `step` is the new step's
    number (for fault injection)."""
    gas = len(batches)
    lrs = {str(g.get("name", i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
    n_labels = dist.all_reduce(torch.tensor([sum(label_tokens(b) for b in batches)], dtype=torch.float64))
    n_labels = max(float(n_labels.item()), 1.0)
    scale = world * gas / n_labels
    loss_sum = torch.zeros((), dtype=torch.float64)
    skipped = 0
    for batch in batches:
        loss, _ = engine(to_device(batch, device))
        if faults.loss_is_nan(step):
            loss = loss * float("nan")
        faults.maybe_sleep(step)
        bad = dist.all_reduce(torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0]), "max").item()
        if bad:
            skipped += 1
            if gas == 1:
                break  # no backward, no step: the update is skipped on every rank alike
            engine.step()  # keep DeepSpeed's accumulation boundary aligned; this micro-batch adds nothing
            continue
        engine.backward(loss * scale)
        engine.step()
        loss_sum += loss.detach().double().cpu()
    total = dist.all_reduce(loss_sum.clone()).item()
    norm = engine.get_global_grad_norm() if not skipped or gas > 1 else None
    return StepResult(loss=total / n_labels if not skipped else float("nan"), grad_norm=_float(norm),
                      nonfinite=bool(skipped), label_tokens=n_labels, lrs=lrs)


def _float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


class FlopsMeter:
    """Model FLOPs of the micro-batches this rank ran (forward + backward by what trains, no recomputation), from
    the analytic model in pretrain.model.flops: sample lengths (image tokens included), images, and the label
    positions where the LM head runs."""

    def __init__(self, shape: VLMShape | None, stage: str) -> None:
        self.shape, self.stage = shape, stage
        self.flops = 0.0

    @classmethod
    def for_model(cls, llava_config: Any, projector: str, stage: str) -> FlopsMeter:
        try:
            return cls(VLMShape.from_llava_config(llava_config, projector), stage)
        except ValueError:  # a decoder or tower the FLOPs model does not know: no MFU, training goes on
            return cls(None, stage)

    def batch_flops(self, batch: dict) -> float:
        if self.shape is None:
            return 0.0
        lens = [n for row in batch["sample_lengths"] for n in row]
        images = 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
        return step_flops(self.shape, lens, images, label_tokens(batch), self.stage).total

    def add(self, batches: list[dict]) -> None:
        self.flops += sum(self.batch_flops(b) for b in batches)

    def take(self) -> float:
        flops, self.flops = self.flops, 0.0
        return flops


def mfu(total_flops: float, elapsed_s: float, world: int, device_name: str | None) -> float | None:
    """Model FLOPs (summed over ranks) over elapsed time x the dense bf16 peak of every device; None without a
    known accelerator (CPU) or a FLOPs model."""
    if device_name is None or total_flops <= 0 or elapsed_s <= 0:
        return None
    try:
        peak = peak_flops(device_name)
    except ValueError:
        return None
    return total_flops / (elapsed_s * world * peak)


def device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
