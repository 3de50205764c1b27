"""The training loop: one process of a data-parallel DeepSpeed run.

Loss normalisation: the loss of a step is the sum of token losses over the label tokens of the whole global batch
(all micro-batches of the accumulation window, all ranks) divided by their count, not a mean of per-rank means. The
label count is all-reduced before the window's backward passes, and each micro-batch's summed loss is scaled by
dp x accumulation / count, because DeepSpeed divides by both.
"""

from __future__ import annotations

import logging
import math
import time
from importlib.metadata import version
from pathlib import Path

import torch

from pretrain.config import Config, save_config
from pretrain.data.errors import REASONS
from pretrain.data.stream import DataSourceError
from pretrain.data.text import IGNORE
from pretrain.train import checkpoint as ckpt
from pretrain.train import dist
from pretrain.train.ds_config import build_ds_config
from pretrain.train.faults import Faults
from pretrain.train.metrics import MetricsWriter
from pretrain.train.setup import build_engine, make_loader
from pretrain.train.signals import StopRequest

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, a broken data source)."""


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.rank, self.world, _ = dist.init(cfg.deepspeed.timeout_minutes)
        cfg.check_world_size(self.world)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.device = dist.device()
        self.ds_config = build_ds_config(cfg, self.world)
        built = build_engine(cfg, self.ds_config)
        self.engine, self.tokenizer, self.processor = built.engine, built.tokenizer, built.processor
        self.image_processor = built.image_processor
        self.trainable = built.trainable
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        loader_state = self._resume()
        self.loader = make_loader(cfg, cfg.data.train, self.processor, self.tokenizer.pad_token_id, self.rank,
                                  self.world, train=True, state=loader_state)
        self.stop = StopRequest()
        self.faults = Faults()
        self.flops_per_token = None  # set by the bench/MFU integration when a FLOPs model is available

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _resume(self) -> dict | None:
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        if path is None:
            return None
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {path}")
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.nonfinite_total = client.get("nonfinite_total", 0)
        mine = ckpt.read_rank_state(path, self.rank)
        if mine is not None and client.get("world_size") == self.world:
            ckpt.set_rng_state(mine["rng"])
            loader_state = mine["loader"]
        else:
            # Another world size: every rank reads rank 0's loader state to agree on the epoch to restart at.
            loader_state = (mine or ckpt.read_rank_state(path, 0))["loader"]
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        return loader_state

    def save(self) -> Path:
        tag = ckpt.tag_for(self.step)
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                  "nonfinite_total": self.nonfinite_total,
                  "versions": {p: version(p) for p in ("torch", "deepspeed", "transformers")}}
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state=client, save_latest=False)
        self.faults.maybe_kill_in_save(self.rank, self.step)
        ckpt.write_rank_state(self.ckpt_root / tag, self.rank,
                              {"loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "step": self.step})
        if self.rank == 0:
            # What an export needs besides the weights: the Llava config, tokenizer and image processor.
            meta = self.ckpt_root / tag / ckpt.HF_META
            self.engine.module.vlm.config.save_pretrained(meta)
            self.tokenizer.save_pretrained(meta)
            self.image_processor.save_pretrained(meta)
        dist.barrier()  # every rank has written its shards and state
        if self.rank == 0:
            ckpt.commit(self.ckpt_root, tag, {"step": self.step, "world_size": self.world,
                                              "zero_stage": self.cfg.deepspeed.zero_stage})
            ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        dist.barrier()
        return self.ckpt_root / tag

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def _train_step(self, batches: list[dict]) -> dict:
        engine = self.engine
        gas = len(batches)
        n_labels = dist.all_reduce(torch.tensor([sum(_label_tokens(b) for b in batches)], dtype=torch.float64))
        n_labels = max(float(n_labels.item()), 1.0)
        scale = self.world * gas / n_labels
        loss_sum = torch.zeros((), dtype=torch.float64)
        skipped = 0
        for batch in batches:
            loss, _ = engine(_to_device(batch, self.device))
            if self.faults.loss_is_nan(self.step + 1):
                loss = loss * float("nan")
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
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        else:
            self.nonfinite_in_row = 0
        norm = engine.get_global_grad_norm() if not skipped or gas > 1 else None
        return {"loss": total / n_labels if not skipped else float("nan"), "grad_norm": _float(norm),
                "nonfinite": bool(skipped), "label_tokens": n_labels}

    # -- the loop ---------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        self.stop.install()
        if self.rank == 0:
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
        writer = MetricsWriter(self.run_dir, t.max_steps, self.step, self.rank == 0, t.progress_bar)
        it = iter(self.loader)
        window_start, wait, n_tokens, n_samples, done = time.perf_counter(), 0.0, 0, 0, 0
        code = dist.EXIT_OK
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                batches = [next(it) for _ in range(t.grad_accum)]
                wait += time.perf_counter() - t0
                out = self._train_step(batches)
                self.step += 1
                self.faults.maybe_die(self.rank, self.step)
                done += 1
                n_tokens += sum(int(b["attention_mask"].sum()) for b in batches)
                n_samples += sum(b["n_samples"] for b in batches)
                if out["nonfinite"] and self.nonfinite_in_row >= t.max_nonfinite_in_row:
                    raise TrainingStopped(f"{self.nonfinite_in_row} non-finite steps in a row (limit "
                                          f"train.max_nonfinite_in_row={t.max_nonfinite_in_row}); the last good "
                                          "checkpoint is intact")
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    self._log(writer, out, elapsed, wait, n_tokens, n_samples, done)
                    window_start, wait, n_tokens, n_samples, done = time.perf_counter(), 0.0, 0, 0, 0
                writer.advance(1, None if math.isnan(out["loss"]) else out["loss"])
                if t.val_every and self.step % t.val_every == 0:
                    self._validate(writer)
                every = cfg.checkpoint.every_steps
                signalled = dist.all_reduce(torch.tensor([1.0 if self.stop.requested else 0.0]), "max").item()
                sliced = t.stop_at_step is not None and self.step >= t.stop_at_step
                if signalled or sliced or (every and self.step % every == 0) or self.step == t.max_steps:
                    self.save()
                if signalled:
                    code = dist.EXIT_PREEMPTED
                    self._mark("PREEMPTED")
                    break
                if sliced:
                    break
            if code == dist.EXIT_OK and self.step >= t.max_steps:
                self._mark("DONE")
        finally:
            writer.close()
        return code

    def _mark(self, name: str) -> None:
        """DONE / PREEMPTED in the run directory: what a chained job or `pretrain launch` reads back."""
        if self.rank == 0:
            (self.run_dir / name).write_text(f"{self.step}\n")

    def _log(self, writer: MetricsWriter, out: dict, elapsed: float, wait: float, n_tokens: int, n_samples: int,
             steps: int) -> None:
        totals = dist.all_reduce(torch.tensor([n_tokens, n_samples], dtype=torch.float64))
        self.tokens_seen += int(totals[0].item())
        stats = self.loader.stats()
        self._check_bad_fraction(stats)
        skipped = _reduce_counts(stats["skipped"])
        lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}
        values = {
            "loss": out["loss"], "lr": next(iter(lrs.values())), "grad_norm": out["grad_norm"],
            "tokens_per_s": totals[0].item() / elapsed, "samples_per_s": totals[1].item() / elapsed,
            "mfu": self._mfu(totals[0].item() / elapsed), "data_wait_frac": wait / elapsed,
            "step_time_s": elapsed / steps, "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_total,
            "skipped": skipped,
        }
        if torch.cuda.is_available():
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        writer.log(self.step, values, tb_only={**lrs, **{f"data/skipped_{k}": v for k, v in skipped.items()}})

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not torch.cuda.is_available() or not self.flops_per_token:
            return None
        from pretrain.model.flops import PEAK_FLOPS

        return self.flops_per_token * tokens_per_s / (PEAK_FLOPS["h100"] * self.world)

    def _check_bad_fraction(self, stats: dict) -> None:
        d = self.cfg.data
        ok = dist.all_reduce(torch.tensor(stats["ok"], dtype=torch.float64))
        bad = dist.all_reduce(torch.tensor([sum(s.values()) for s in stats["skipped"]], dtype=torch.float64))
        for i in range(len(ok)):
            seen = ok[i] + bad[i]
            if seen >= d.bad_min_samples and bad[i] / seen > d.max_bad_fraction:
                raise DataSourceError(
                    f"data source {i} ({d.train[i].urls}): {int(bad[i])} of {int(seen)} samples skipped "
                    f"({bad[i] / seen:.1%} > data.max_bad_fraction={d.max_bad_fraction}); reasons: "
                    f"{stats['skipped'][i]}. Run `pretrain shards verify` on it.")

    @torch.no_grad()
    def validate(self) -> float:
        loader = make_loader(self.cfg, self.cfg.data.val, self.processor, self.tokenizer.pad_token_id, self.rank,
                             self.world, train=False)
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for _, batch in zip(range(self.cfg.train.val_batches), loader):
            loss, n = self.engine(_to_device(batch, self.device))
            total += torch.tensor([loss.item(), n.item()], dtype=torch.float64)
        self.engine.train()
        total = dist.all_reduce(total)
        return total[0].item() / max(total[1].item(), 1.0)

    def _validate(self, writer: MetricsWriter) -> None:
        val = self.validate()
        writer.scalar("val/loss", val, self.step)
        writer.scalar("val/perplexity", math.exp(min(val, 50.0)), self.step)
        if self.rank == 0:
            with open(self.run_dir / "val.jsonl", "a") as f:
                f.write(f'{{"step": {self.step}, "val_loss": {val}}}\n')


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _reduce_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    """Skip counts summed over sources and ranks, over the fixed reason list so every rank reduces alike."""
    local = torch.zeros(len(REASONS), dtype=torch.float64)
    for d in dicts:
        for k, v in d.items():
            local[REASONS.index(k) if k in REASONS else -1] += v
    total = dist.all_reduce(local)
    return {k: int(v) for k, v in zip(REASONS, total.tolist()) if v}
