"""The correctness checks of a device before anything is timed on it: what the CPU test suite cannot show about
CUDA, run on a tiny decoder + tower in one process (tools/gpu_bench.sh runs it first on a GPU machine; on a CPU it
runs the same code at tiny sizes under gloo, so it cannot rot).

    python -m pretrain.bench.device_check --out checks.json [--dtype bf16|fp32] [--matmul 8192]

Checks, each timed and reported on its own (one failing does not stop the others):
- attention: for every attention implementation that runs here (sdpa, eager, flex_attention, flash_attention_2 when
  its kernel runs), in train mode with non-reentrant activation checkpointing: packed rows give every sample the
  per-token losses it has alone, and the same parameter gradients; and a mask that merges a row's samples moves
  the losses by far more than the tolerance (so the comparison can fail);
- recompiles: under flex_attention, three training batches of one row width compile once (dynamo's recompile
  log, what TORCH_LOGS=recompiles prints, is counted after the first);
- collectives: every collective of pretrain.distributed at world size 1 on this device's backend (NCCL on CUDA,
  gloo on the CPU), values checked;
- checkpoint: a ZeRO-3 DeepSpeed engine trains 2 steps, saves, takes a 3rd; a fresh engine loads the save and its
  3rd step's loss is the same;
- matmul: an N^3 matmul (bf16 on CUDA) timed, its TFLOP/s the practical ceiling MFU is read against.
The JSON has one object per check: {"ok": bool, "seconds": s, ...} (or {"ok": false, "error": ...}).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain import distributed
from pretrain.tokens import IGNORE

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")
# Packed vs alone agree to rounding; these bound the relative difference (losses per sample, the gradient vector).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# Every collective of pretrain.distributed (the `collectives` check runs each; a test holds the list complete).
COLLECTIVES = ("all_reduce", "all_reduce_values", "all_gather", "all_gather_with_grad", "broadcast_object",
               "all_gather_object", "barrier", "rank0_work", "rendezvous_store")
# A mask leak must move the losses by this many tolerances for the comparison to count as able to fail.
LEAK_MARGIN = 3.0


@contextlib.contextmanager
def flex_backward_on_cpu(device: torch.device):
    """On a CPU, flex_attention's training path with flex's own unfused implementation. torch refuses its backward
    on a CPU (`_validate_device` raises NotImplementedError: eager and compiled alike), and transformers compiles it
    with inductor; so here transformers' compiled function is swapped for the plain `flex_attention` (its math, with
    autograd) and the device guard is lifted. What this proves: our block masks, checkpointing and ZeRO-3 around
    flex, forward and backward; not the fused kernel, which only a GPU runs (this module's checks there). A no-op
    on CUDA. The model must stay in train mode inside (transformers recompiles on a train/eval switch)."""
    if device.type == "cuda":
        yield
        return
    import torch.nn.attention.flex_attention as flex
    from transformers.integrations.flex_attention import WrappedFlexAttention

    wrapper = WrappedFlexAttention(True)  # transformers' singleton (torch.compile is lazy: nothing compiles here)
    saved = wrapper._compiled_flex_attention, flex._validate_device
    wrapper._compiled_flex_attention, flex._validate_device = flex.flex_attention, lambda *_: None
    try:
        yield
    finally:
        wrapper._compiled_flex_attention, flex._validate_device = saved


def tiny_model(impl: str, dtype: torch.dtype, device: torch.device, zero: Any = None, cuda_sizes: bool = False):
    """A tiny Llama decoder + CLIP tower (random init, seeded), stage `full`, activation checkpointing on every
    layer, in train mode on `device`; returns (VLMForTraining, tokenizer)."""
    from pretrain.config import ModelConfig
    from pretrain.model.build import build_model
    from pretrain.model.checkpointing import enable_activation_checkpointing
    from pretrain.model.stages import apply_stage
    from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES, build_tokenizer
    from pretrain.model.vlm import VLMForTraining

    llm, vision = dict(DECODER_SHAPES["llama"]), dict(VISION_SHAPES["clip"])
    if cuda_sizes:  # head dimensions the CUDA kernels are tuned for (64), still tiny
        llm.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
        vision.update(hidden_size=128, intermediate_size=256, num_attention_heads=2)
    tokenizer = build_tokenizer(["a red circle left of a blue square", "two green triangles", "hello there"],
                                vocab_size=300)
    mcfg = ModelConfig(llm=llm, vision=vision, attn_implementation=impl, vision_feature_layer=-1)
    model = build_model(mcfg, tokenizer, zero, dtype=dtype, seed=0, packing=True)
    apply_stage(model, "full")
    enable_activation_checkpointing(model, "full")
    wrapper = VLMForTraining(model).to(device).train()
    return wrapper, tokenizer


def samples(config: Any, lengths: tuple[int, ...], seed: int = 0) -> list:
    """Samples of random tokens with `lengths` label tokens each; every other one has an image (the first does)."""
    from pretrain.data.sample import ProcessedSample

    g = torch.Generator().manual_seed(seed)
    text, size = config.text_config, config.vision_config.image_size
    words = [t for t in range(8, text.vocab_size) if t not in (config.image_token_id, text.pad_token_id)]
    out = []
    for i, n in enumerate(lengths):
        image = i % 2 == 0
        head = [text.bos_token_id] + [config.image_token_id] * (config.image_seq_length if image else 0) + [9, 10]
        body = [words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g)]
        pixels = torch.randn(3, size, size, generator=g) if image else None
        out.append(ProcessedSample(head + body, [IGNORE] * len(head) + body, pixels))
    return out


def packed_and_alone(items: list, pad_id: int) -> tuple[dict, list[dict]]:
    """Three samples as two packed rows ([s0 s1], [s2 + pad]) and alone ([s0], [s1]) + ([s2], an empty row): every
    batch of shape (2, W), so a kernel compiled per shape compiles once; the alone batches hold each sample once."""
    from pretrain.data.batching import collate

    width = len(items[0]) + len(items[1])
    packed = collate([items[:2], items[2:]], pad_id, widths=(width,))
    alone = [collate([[items[0]], [items[1]]], pad_id, widths=(width,)),
             collate([[items[2]], []], pad_id, widths=(width,))]
    return packed, alone


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def per_token_loss(wrapper: Any, batch: dict) -> torch.Tensor:
    """Loss of every next-token prediction of a VLMForTraining (IGNORE positions 0), shape (B, T-1), through the
    plain LM head (not the fused chunked one the training loss takes): the reference a per-sample loss is read from."""
    hidden = wrapper.hidden_states(batch)[:, :-1]
    targets = batch["labels"][:, 1:]
    logits = wrapper.vlm.lm_head(hidden).float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return loss * (targets != IGNORE)


def _per_sample(wrapper: Any, batch: dict, device: torch.device) -> list[torch.Tensor]:
    """Each sample's own next-token losses (not the prediction across a boundary into the next sample)."""
    with torch.no_grad():
        losses = per_token_loss(wrapper, _on(batch, device)).float().cpu()
    out = []
    for r, row in enumerate(batch["sample_lengths"]):
        at = 0
        for k in row:
            out.append(losses[r, at : at + k - 1])
            at += k
    return out


def _grads(wrapper: Any, batches: list[dict], device: torch.device) -> torch.Tensor:
    """The summed loss's gradient over `batches`, all parameters flattened (fp32, on the CPU)."""
    wrapper.zero_grad(set_to_none=True)
    for batch in batches:
        loss, _ = wrapper(_on(batch, device))
        loss.backward()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1).cpu()
                      for p in params])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def attention_parity(impl: str, dtype: torch.dtype, device: torch.device, cuda_sizes: bool = False) -> dict[str, Any]:
    """Packed vs alone per-sample losses and gradients for one implementation (see the module docstring)."""
    wrapper, tokenizer = tiny_model(impl, dtype, device, cuda_sizes=cuda_sizes)
    items = samples(wrapper.vlm.config, (23, 14, 17))
    packed, alone = packed_and_alone(items, tokenizer.pad_token_id)
    got = _per_sample(wrapper, packed, device)
    want = _per_sample(wrapper, alone[0], device) + _per_sample(wrapper, alone[1], device)[:1]
    loss_diff = max(_relative(g.sum(), w.sum()) for g, w in zip(got, want))
    leaky = {**packed, "sample_lengths": [[sum(row)] for row in packed["sample_lengths"]]}
    leak = max(_relative(g.sum(), w.sum()) for g, w in zip(_per_sample(wrapper, leaky, device), want))
    grad_diff = _relative(_grads(wrapper, [packed], device), _grads(wrapper, alone, device))
    tol = TOLERANCE[dtype]
    return {"ok": loss_diff <= tol and grad_diff <= tol and leak >= LEAK_MARGIN * tol, "loss_rel_diff": loss_diff,
            "grad_rel_diff": grad_diff, "leak_rel_diff": leak, "tolerance": tol, "width": packed["input_ids"].shape[1]}


class _RecompileLog(logging.Handler):
    """Collects dynamo's recompile messages (the `recompiles` artifact that TORCH_LOGS=recompiles prints)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0])


@contextlib.contextmanager
def recompile_log():
    """Dynamo's recompile messages while inside (a list that fills as they come)."""
    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    handler = _RecompileLog()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def flex_recompiles(dtype: torch.dtype, device: torch.device, cuda_sizes: bool = False) -> dict[str, Any]:
    """Three training steps under flex_attention on batches of one width (different sample lengths): dynamo may
    compile for the first, never again after it."""
    from pretrain.data.batching import collate

    wrapper, tokenizer = tiny_model("flex_attention", dtype, device, cuda_sizes=cuda_sizes)
    width, after_first = 96, []
    with recompile_log() as messages:
        for step, lengths in enumerate([(30, 12, 20), (9, 25, 31), (40, 6, 11)]):
            items = samples(wrapper.vlm.config, lengths, seed=step)
            batch = collate([items[:2], items[2:]], tokenizer.pad_token_id, widths=(width,))
            seen = len(messages)
            loss, _ = wrapper(_on(batch, device))
            loss.backward()
            if step > 0:
                after_first += messages[seen:]
    return {"ok": not after_first, "recompiles_after_first": after_first, "width": width, "batches": 3}


def collectives(device: torch.device) -> dict[str, Any]:
    """Every collective of pretrain.distributed at world size 1 (the group distributed.init made), values checked."""
    rank, world = distributed.rank_and_world()
    x = torch.arange(4, dtype=torch.float32, device=device) + 1
    results = {
        "all_reduce": all(torch.equal(distributed.all_reduce(x, op).cpu(), x.cpu() * (world if op == "sum" else 1))
                          for op in ("sum", "max", "min")),
        "all_reduce_values": distributed.all_reduce_values([1.5, torch.tensor(2.0, device=device)]) == [1.5 * world,
                                                                                                  2.0 * world],
        "all_gather": [g.cpu().tolist() for g in distributed.all_gather(x)] == [x.cpu().tolist()] * world,
        "broadcast_object": distributed.broadcast_object({"tag": "step_1"}) == {"tag": "step_1"},
        "all_gather_object": distributed.all_gather_object(rank) == list(range(world)),
        "rank0_work": distributed.rank0_work(lambda: 7, rank, 1.0) == (7 if rank == 0 else None),
        "rendezvous_store": _store_round_trip(rank),
    }
    leaf = x.clone().requires_grad_()
    gathered = distributed.all_gather_with_grad(leaf)
    torch.stack(gathered).sum().backward()
    results["all_gather_with_grad"] = len(gathered) == world and bool((leaf.grad.cpu() == world).all())
    distributed.barrier()
    results["barrier"] = True
    assert set(results) == set(COLLECTIVES), sorted(set(results) ^ set(COLLECTIVES))
    return {"ok": all(results.values()), "checks": results, "backend": distributed.backend_devices(),
            "world_size": world}


def _store_round_trip(rank: int) -> bool:
    """The watchdog's path: a key set through this rank's own store connection is read back."""
    store = distributed.rendezvous_store(30.0)
    key = f"device_check/{rank}"
    store.set(key, "alive")
    return store.get(key) == b"alive"


def checkpoint_resume(dtype: torch.dtype, device: torch.device, work: Path) -> dict[str, Any]:
    """ZeRO-3 engine: 2 steps, save, the 3rd step's loss; a fresh engine loaded from the save: the same loss."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.model.build import ZeroContext

    ds_config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * distributed.rank_and_world()[1],
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
                 "bf16": {"enabled": dtype == torch.bfloat16}, "zero_force_ds_cpu_optimizer": False}

    def engine():
        keep = HfDeepSpeedConfig(ds_config)  # transformers builds partitioned while it lives
        wrapper, tokenizer = tiny_model("sdpa", dtype, device, zero=ZeroContext(ds_config))
        optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-3)
        built, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config)
        del keep
        return built, tokenizer

    def step(built, batch) -> float:
        loss, n = built(_on(batch, device))
        built.backward(loss / int(n))
        built.step()
        return float(loss.detach())

    first, tokenizer = engine()
    batches = [packed_and_alone(samples(first.module.vlm.config, (15, 9, 12), seed=s), tokenizer.pad_token_id)[0]
               for s in range(3)]
    losses = [step(first, b) for b in batches[:2]]
    first.save_checkpoint(str(work), tag="step2")
    want = step(first, batches[2])
    del first
    second, _ = engine()
    second.load_checkpoint(str(work), tag="step2")
    got = step(second, batches[2])
    return {"ok": got == want, "losses": losses, "next_loss": want, "resumed_next_loss": got}


def matmul_ceiling(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> dict[str, Any]:
    """TFLOP/s of an n^3 matmul (the mean of `repeats` after 3 warm-ups) on random data."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"ok": True, "n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / seconds / 1e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def implementations(device: torch.device) -> dict[str, str | None]:
    """{implementation: None if it runs here, else why not}."""
    from pretrain.model.attention import flash_attn_works, flex_attention_available

    why: dict[str, str | None] = {"sdpa": None, "eager": None}
    why["flex_attention"] = None if flex_attention_available() else f"no flex_attention in torch {torch.__version__}"
    if device.type != "cuda":
        why["flash_attention_2"] = "flash-attn needs CUDA"
    else:
        works, reason = flash_attn_works()
        why["flash_attention_2"] = None if works else reason
    return why


def timed(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = check()
    except Exception as err:  # reported, and the other checks still run
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"device check: {'ok  ' if result['ok'] else 'FAIL'} {result['seconds']:7.1f} s  {check.__name__}",
          flush=True)
    return result


def run_checks(dtype: torch.dtype, matmul_n: int, work: Path) -> dict[str, Any]:
    device = distributed.device()
    cuda = device.type == "cuda"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
                              "torch": torch.__version__, "checks": {}}
    checks = report["checks"]
    impls = implementations(device)
    report["skipped_implementations"] = {k: v for k, v in impls.items() if v}
    for impl in (i for i in IMPLEMENTATIONS if impls[i] is None):
        def parity(impl: str = impl) -> dict[str, Any]:
            with flex_backward_on_cpu(device):
                return attention_parity(impl, dtype, device, cuda)
        parity.__name__ = f"attention {impl}"
        checks[f"attention_{impl}"] = timed(parity)
    if impls["flex_attention"] is None:
        def recompiles() -> dict[str, Any]:
            with flex_backward_on_cpu(device):
                return flex_recompiles(dtype, device, cuda)
        checks["recompiles"] = timed(recompiles)

    def collectives_here() -> dict[str, Any]:
        return collectives(device)

    def checkpoint() -> dict[str, Any]:
        return checkpoint_resume(dtype, device, work / "checkpoint")

    def matmul() -> dict[str, Any]:
        return matmul_ceiling(device, matmul_n, torch.bfloat16 if cuda else torch.float32)

    checks["collectives"] = timed(collectives_here)
    checks["checkpoint"] = timed(checkpoint)
    checks["matmul"] = timed(matmul)
    report["ok"] = all(c["ok"] for c in checks.values())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.device_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON report")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--matmul", type=int, default=None, help="matmul size N (default 8192 on CUDA, 256 on a CPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    distributed.init(2.0)  # world size 1 (or the launcher's): NCCL on CUDA, gloo on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        report = run_checks(dtype, args.matmul or (8192 if cuda else 256), Path(tmp))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"device check: {'all ok' if report['ok'] else 'FAILED'} -> {args.out}", flush=True)
    distributed.finish(0 if report["ok"] else 1, synchronize=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
