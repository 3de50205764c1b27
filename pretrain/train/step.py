"""One optimizer step over an accumulation window, and the model FLOPs it did (for MFU).

Loss normalisation: the loss of a step is the sum of token losses over the label tokens of the whole global batch
(all micro-batches of the accumulation window, all ranks) divided by their count, not a mean of per-rank means. The
label count comes from the host batch and is all-reduced on the device before the window's backward passes (no read
back), and each micro-batch's summed loss is scaled by `grad_divisor` x accumulation / count, because DeepSpeed
divides by both (`grad_divisor`: the world size; under sequence parallelism see pretrain.model.sequence_parallel).

One host synchronisation per step: the loss sum and the non-finite count stay on the device; after the last
micro-batch's forward they are reduced in one collective with the caller's host numbers (`shared`: the stop request,
and on logging steps the window's counters) and read back once. The grad norm is read only when asked (logging).

Non-finite losses: a step with a non-finite loss in any micro-batch on any rank is skipped whole, on every rank
alike, and no NaN reaches the weights. Without accumulation the update is simply not made (no backward, no
optimizer step). With accumulation the earlier micro-batches have already run their backward, so every rank runs the
last backward with a non-finite loss and DeepSpeed's overflow check discards the gradients and skips the update
(ZeRO 1-3; stage 0 has none: the gradients are zeroed and the optimizer steps at learning rate 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain import distributed
from pretrain.data.batching import label_count
from pretrain.model.flops import VLMShape, step_flops
from pretrain.model.sequence_parallel import shard_batch


@dataclass
class StepResult:
    loss: float  # nan when the update was skipped
    grad_norm: float | None
    nonfinite: bool
    label_tokens: float  # over the global batch
    lrs: dict[str, float]  # learning rate of each parameter group for this step (before the scheduler moved on)
    shared: list[float] = field(default_factory=list)  # the caller's `shared` numbers summed over ranks
    stop: bool = False  # some rank's `stop_requested()` said so (read as late as the step's one collective)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(engine: Any, batches: list[dict], grad_divisor: int, device: torch.device,
               shared: Sequence[float] = (), read_grad_norm: bool = True,
               stop_requested: Callable[[], bool] = lambda: False,
               phase: Callable[[str], None] = lambda _: None) -> StepResult:
    """Forward/backward over the micro-batches of one step and the optimizer update. `shared`: host numbers to sum
    over ranks in the step's one collective, which also carries `stop_requested()` (asked after the last forward,
    so a signal during the step is seen in this step). `phase(name)` is told where the step is (forward, backward,
    optimizer), for the hang watchdog."""
    gas = len(batches)
    # Under sequence parallelism each rank computes the loss of its shard's label rows (and counts only those).
    batches = [shard_batch(b, getattr(engine.module, "sequence_parallel", None)) for b in batches]
    lrs = {str(g.get("name", i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
    n_local = sum(label_count(b["labels"]) for b in batches)
    n_global = distributed.all_reduce(torch.tensor(float(n_local), dtype=torch.float64).to(device, non_blocking=True))
    scale = (grad_divisor * gas) / n_global.clamp(min=1.0)  # on the device: nothing is read back here
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_bad = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        phase("forward")
        loss, _ = engine(to_device(batch, device))
        loss_sum += loss.detach().double()
        n_bad += (~torch.isfinite(loss.detach())).double()
        if i < gas - 1:
            phase("backward")
            engine.backward(loss * scale.to(loss.dtype))
            phase("optimizer")
            engine.step()
    stop = 1.0 if stop_requested() else 0.0
    total, bad, n_labels, stops, *shared_sums = distributed.all_reduce_values([loss_sum, n_bad, n_local, stop, *shared])
    if bad:
        _skip_update(engine, loss, gas)
    else:
        phase("backward")
        engine.backward(loss * scale.to(loss.dtype))
        phase("optimizer")
        engine.step()
    norm = _float(engine.get_global_grad_norm()) if read_grad_norm and not bad else None
    n_labels = max(n_labels, 1.0)
    return StepResult(loss=total / n_labels if not bad else float("nan"), grad_norm=norm, nonfinite=bool(bad),
                      label_tokens=n_labels, lrs=lrs, shared=shared_sums, stop=stops > 0)


def _skip_update(engine: Any, loss: torch.Tensor, gas: int) -> None:
    """Every rank calls this alike when the step had a non-finite loss anywhere; the weights stay as they were."""
    if gas == 1:
        return  # no backward ran: no gradient to drop, no optimizer step
    # The accumulation boundary must still pass (DeepSpeed counts micro-steps); make every rank's gradients
    # non-finite so the overflow check of the ZeRO optimizer discards them all and skips the update.
    engine.backward(loss * float("nan"))
    if engine.zero_optimization_stage() == 0:
        _step_without_update(engine)
        return
    engine.step()
    if engine.was_step_applied():
        raise RuntimeError("DeepSpeed applied an update with non-finite gradients; enable its overflow check "
                           "(bf16.check_grad_overflow, gradient clipping)")


def _step_without_update(engine: Any) -> None:
    """Stage 0 has no overflow check: zero the gradients and step at learning rate 0, so no weight moves (Adam's
    moment estimates decay by one step; the schedule moves on as for any step)."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    groups = engine.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    engine.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr if g["lr"] == 0.0 else g["lr"]  # the scheduler may already have set the next step's rate


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
        images += sum(batch.get("video_frames") or [])  # clip frames run through the tower like tiles
        return step_flops(self.shape, lens, images, label_count(batch["labels"]), self.stage).total

    def add(self, batches: list[dict]) -> None:
        self.flops += sum(self.batch_flops(b) for b in batches)

    def take(self) -> float:
        flops, self.flops = self.flops, 0.0
        return flops


def device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
