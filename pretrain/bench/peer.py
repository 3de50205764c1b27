"""The peer of `pretrain bench train --peer`: the same model on the same data with the same global batch, trained
the way most LLaVA-style code does it today: transformers' Trainer with `deepspeed=` LLaVA's ZeRO config (the same
ZeRO stage and offload as ours), a map-style dataset calling the image processor and the tokenizer per sample, and a
collator padding each micro-batch to its longest sample (no packing, full-vocabulary logits inside the model).

Runs as one process of a torchrun job (`pretrain.bench.worker peer`); rank 0 writes `metrics.jsonl` (per step:
time, tokens, samples, model FLOPs, data wait) and `result.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from pretrain import distributed
from pretrain.bench.common_practice import LlavaShardDataset, LlavaStyleSample, llava_collate
from pretrain.config import Config
from pretrain.data.batching import label_count
from pretrain.data.urls import expand_urls
from pretrain.model.flops import VLMShape, step_flops
from pretrain.train.engine import loader_workers


def llava_ds_config(cfg: Config) -> dict[str, Any]:
    """LLaVA's scripts/zero3.json (zero3_offload.json when ours offloads), at our ZeRO stage; "auto" values are
    filled in by transformers from the TrainingArguments, as for every HF Trainer user."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "sub_group_size": 1e9, "reduce_bucket_size": "auto"}
    if ds.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                     "stage3_gather_16bit_weights_on_model_save": True})
    out: dict[str, Any] = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
                           "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                           "zero_optimization": zero}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
        out["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}}
    if ds.offload_params != "none":
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": True}
    return out


def training_arguments(cfg: Config, out_dir: Path, batch: int, steps: int) -> TrainingArguments:
    t, cuda = cfg.train, torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=t.grad_accum,
        max_steps=steps, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0],
        adam_beta2=t.betas[1], warmup_steps=t.warmup_steps, lr_scheduler_type=t.schedule, max_grad_norm=t.grad_clip,
        bf16=t.precision == "bf16", deepspeed=llava_ds_config(cfg),
        gradient_checkpointing=cfg.model.activation_checkpointing != "none",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=loader_workers(cfg.data.num_workers),
        dataloader_pin_memory=cuda, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, seed=cfg.run.seed, use_cpu=not cuda)


class _TimedTrainer(Trainer):
    """transformers' Trainer, unchanged but for a stopwatch around fetching each step's batches."""

    shape: VLMShape | None = None
    stage: str = "full"

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Any:
        start = time.perf_counter()
        batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.bench["wait_s"] += time.perf_counter() - start
        for b in batches:  # counted after the stopwatch: reading device tensors waits for the GPU
            lens = b["attention_mask"].sum(1).tolist()
            self.bench["tokens"] += sum(lens)
            self.bench["samples"] += len(lens)
            if self.shape is not None:
                labels = label_count(b["labels"])
                self.bench["flops"] += step_flops(self.shape, lens, len(lens), labels, self.stage).total
        return batches, n_items


class _StepTimer(TrainerCallback):
    def __init__(self, trainer: _TimedTrainer, out: Path | None) -> None:
        self.trainer, self.out, self.last = trainer, out, time.perf_counter()

    def on_train_begin(self, *_: Any, **__: Any) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: Any, *_: Any, **__: Any) -> None:
        now = time.perf_counter()
        b = self.trainer.bench
        tokens, samples, flops = distributed.all_reduce_values([b["tokens"], b["samples"], b["flops"]])
        elapsed = now - self.last
        if self.out is not None:
            record = {"step": state.global_step, "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                      "samples_per_s": samples / elapsed, "data_wait_frac": b["wait_s"] / elapsed,
                      "flops": flops, "samples_per_step": samples}
            with open(self.out, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.trainer.bench = {"tokens": 0, "samples": 0, "flops": 0.0, "wait_s": 0.0}
        self.last = time.perf_counter()


def train_peer(cfg: Config, out_dir: Path, batch: int, steps: int,
               callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Train `steps` optimizer steps; returns what rank 0 writes to result.json. `callbacks`: more of
    transformers' TrainerCallback (a sync counter)."""
    from pretrain.model.build import ZeroContext, build_model, load_tokenizer
    from pretrain.model.processing import image_processor_for, vlm_config_for
    from pretrain.model.stages import apply_stage

    # The process group before the TrainingArguments: they build DeepSpeed's config, which reads the world size
    # from torch.distributed once (1 when uninitialised: its batch-size check then fails on 2 ranks).
    distributed.init(cfg.deepspeed.timeout_minutes)
    args = training_arguments(cfg, out_dir, batch, steps)  # first: it makes the model build under zero.Init
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, ZeroContext(args.hf_deepspeed_config.config), seed=cfg.run.seed)
    apply_stage(model, cfg.train.stage)  # the same parts train (LLaVA freezes the tower / the LLM likewise)
    vlm_config = vlm_config_for(cfg.model, tokenizer)
    make = LlavaStyleSample(image_processor_for(cfg.model), tokenizer, vlm_config.image_token_id,
                            vlm_config.image_seq_length, cfg.data.max_length)
    dataset = LlavaShardDataset([u for s in cfg.data.train for u in expand_urls(s.urls)], make)
    trainer = _TimedTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=llava_collate(tokenizer.pad_token_id))
    trainer.bench = {"tokens": 0, "samples": 0, "flops": 0.0, "wait_s": 0.0}
    try:
        trainer.shape, trainer.stage = VLMShape.from_llava_config(vlm_config, cfg.model.projector), cfg.train.stage
    except ValueError:  # a decoder or tower the FLOPs model does not know: no MFU
        trainer.shape = None
    rank0 = args.process_index == 0
    metrics = out_dir / "metrics.jsonl"
    if rank0:
        metrics.unlink(missing_ok=True)
    trainer.add_callback(_StepTimer(trainer, metrics if rank0 else None))
    for callback in callbacks:
        trainer.add_callback(callback)
    output = trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"batch": batch, "steps": steps, "train_loss": output.training_loss, "gpu_mem_gib": peak,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
