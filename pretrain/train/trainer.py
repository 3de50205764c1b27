"""The training loop: one process of a data-parallel DeepSpeed run.

What happens where: step.py (one optimizer step, loss normalisation, model FLOPs), checkpoint.py (commit marker,
`latest`, retention), resume.py (what a checkpoint holds: the run's Stateful parts, this trainer among them, and the
resume that restores them), universal.py (resume on another number of ranks), validation.py (val loss, captions),
signals.py (SIGUSR1/SIGTERM -> checkpoint and exit 75), run_log.py (metrics.jsonl, TensorBoard, progress bar),
watchdog.py (a rank without progress ends the run, exit 76), owner.py (one job per run directory).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from pretrain import distributed, exit_codes
from pretrain.config import Config, save_config
from pretrain.data.errors import REASONS
from pretrain.data.stream import DataSourceError
from pretrain.model.flops import mfu
from pretrain.model.sequence_parallel import gradient_divisor
from pretrain.train import checkpoint as ckpt
from pretrain.train import owner, shared_fs, universal
from pretrain.train.config_change import check_resume_config, write_run_config
from pretrain.train.ds_config import build_ds_config
from pretrain.train.engine import build_engine, make_loader
from pretrain.train.preflight import preflight
from pretrain.train.resume import Checkpointer, RNGState, Scope
from pretrain.train.run_log import MetricsWriter
from pretrain.train.samples import SampleRecorder
from pretrain.train.signals import StopRequest
from pretrain.train.step import FlopsMeter, StepResult, device_name, train_step
from pretrain.train.validation import Validator
from pretrain.train.watchdog import VERDICT, Progress, Watchdog

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, a broken data source)."""


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # First, so a signal during the (long) set-up is not fatal: the loop then runs one step and checkpoints.
        self.stop = StopRequest()
        self.stop.install()
        self.rank, self.world, _ = distributed.init(cfg.deepspeed.timeout_minutes)
        preflight(cfg, self.world)  # the same checks `pretrain submit` runs before queueing
        ds = cfg.deepspeed  # the step scales the loss by what DeepSpeed divides the summed gradients by
        self.grad_divisor = gradient_divisor(ds.zero_stage, self.world, ds.sequence_parallel_size)
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.rank == 0:
            self.stop.marker = self.run_dir / "PREEMPTED"
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._claim_run_dir()
        # Shared file systems: one run directory for all ranks, and rank 0's choice of checkpoint for all.
        shared_fs.check_one_run_dir(self.run_dir, self.rank)
        self.device = distributed.device()
        self.resume_from, self.resume_meta = shared_fs.agree_on_resume(cfg.checkpoint.resume, self.ckpt_root,
                                                                       self.rank, cfg.checkpoint.verify)
        if self.resume_from:  # every rank: a changed config stops them all alike
            check_resume_config(cfg, self.resume_from)
        if self.rank == 0:
            write_run_config(cfg, self.run_dir)
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
            (self.run_dir / VERDICT).unlink(missing_ok=True)
        self.universal = universal.prepare(self.resume_from, self.resume_meta, self.world, cfg.deepspeed.zero_stage,
                                           self.rank, cfg.deepspeed.rank0_work_timeout_minutes)
        self.ds_config = build_ds_config(cfg, self.world, load_universal=self.universal)
        if self.rank == 0:  # what DeepSpeed really ran with, after merging a user's file: for the user to check
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
        built = build_engine(cfg, self.ds_config)
        self.engine, self.tokenizer, self.processor = built.engine, built.tokenizer, built.processor
        self.image_processor = built.image_processor
        self.trainable = built.trainable
        self.written = shared_fs.WrittenFiles(self.engine)  # what this rank writes into a checkpoint
        self.step = 0
        self.tokens_seen = 0  # over all ranks, updated at each log and save
        self._pending_tokens = 0  # this rank's tokens not yet counted into tokens_seen
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.writer: MetricsWriter | None = None
        self.tracker_runs: dict[str, str] = {}  # rank 0: the W&B / MLflow runs a resumed run continues
        self.loader = make_loader(cfg, cfg.data.train, self.processor, self.tokenizer.pad_token_id, self.rank,
                                  self.world, train=True)
        self.checkpointer = Checkpointer(self.engine, self.rank, self.world, ds.sequence_parallel_size)
        self.checkpointer.register("trainer", self, Scope.RUN)
        self.checkpointer.register("rng", RNGState(), Scope.RANK)
        self.checkpointer.register("loader", self.loader, Scope.DATA_PARALLEL)
        if self.resume_from:
            self.checkpointer.load(self.resume_from, self.resume_meta, self.universal)
        sp = self.engine.module.sequence_parallel  # a group's ranks share rows: its first counts them, once
        self.counts_rows = sp is None or sp.rank == 0
        self.flops = FlopsMeter.for_model(self.engine.module.vlm.config, cfg.model.projector, cfg.train.stage)
        self.validator = Validator(cfg, self.engine, self.processor, self.tokenizer, self.rank, self.world,
                                   self.device, self.run_dir)
        self.progress = Progress()
        self.watchdog = Watchdog(self.progress, self.rank, self.world, self.run_dir, cfg.train.hang_timeout_minutes,
                                 on_beat=(lambda: owner.heartbeat(self.run_dir)) if self.rank == 0 else None)

    def _claim_run_dir(self) -> None:
        """Collective: rank 0 makes this job the run directory's owner; every rank stops alike if another job,
        alive, owns it."""
        refused = None
        if self.rank == 0:
            try:
                owner.claim(self.run_dir)
            except owner.RunDirOwned as err:
                refused = str(err)
        refused = distributed.broadcast_object(refused)
        if refused:
            raise owner.RunDirOwned(refused)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's own record, a checkpoint's `trainer` part (rank 0's is the one a resume reads)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_total": self.nonfinite_total,
                "tracker_runs": self.writer.run_ids() if self.writer else self.tracker_runs}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.nonfinite_total, self.tracker_runs = state["nonfinite_total"], state["tracker_runs"]

    def save(self) -> Path:
        """Every rank writes its shards and trainer state and reports the files; rank 0 commits what was reported
        while the others wait for it outside any collective (a commit may outlast deepspeed.timeout_minutes on a
        slow file system). A failed write (a full disk) raises CheckpointWriteError naming the checkpoint; earlier
        ones and `latest` stay as they were."""
        tag = ckpt.tag_for(self.step)
        path = self.ckpt_root / tag
        started = time.perf_counter()
        self.progress.enter("save")
        self._sync_tokens()
        try:
            self._write_checkpoint(tag)
            report = self.written.report(path)
            crcs = ckpt.checksums(path, report) if self.cfg.checkpoint.verify == "crc" else None
        except (OSError, RuntimeError) as err:
            raise ckpt.write_failure(self.ckpt_root, tag, err) from err
        gathered = distributed.all_gather_object((report, crcs))  # also: every rank has written its shards and state
        reports = [r for r, _ in gathered]
        crcs = None if crcs is None else {n: c for _, rank_crcs in gathered for n, c in rank_crcs.items()}

        def commit() -> None:
            try:
                ckpt.commit(self.ckpt_root, tag, {"step": self.step, "world_size": self.world,
                                                  "zero_stage": self.cfg.deepspeed.zero_stage}, reports, crcs)
            except OSError as err:
                raise ckpt.write_failure(self.ckpt_root, tag, err) from err
            ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)

        self.progress.enter("commit")
        wait_s = self.progress.commit_wait_s(60 * self.cfg.deepspeed.rank0_work_timeout_minutes)
        distributed.rank0_work(commit, self.rank, wait_s / 60)
        self.progress.save_done(time.perf_counter() - started)
        return path

    def _write_checkpoint(self, tag: str) -> None:
        path = self.ckpt_root / tag
        self.checkpointer.save_engine(path)
        self.written.add(self.checkpointer.save_parts(path))
        if self.rank == 0:
            save_config(self.cfg, path / "config.yaml")  # the resolved config this checkpoint was trained with
            # What an export needs besides the weights: the Llava config, tokenizer and image processor.
            meta = path / ckpt.HF_META
            self.engine.module.vlm.config.save_pretrained(meta)
            self.tokenizer.save_pretrained(meta)
            self.image_processor.save_pretrained(meta)

    # -- the loop ---------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps (or stop_at_step); returns EXIT_OK, or EXIT_PREEMPTED after a signal."""
        t = self.cfg.train
        writer = MetricsWriter(self.run_dir, t.max_steps, self.step, self.rank == 0, t.progress_bar,
                               self.cfg.run.trackers, self.cfg.model_dump(mode="json"), self.tracker_runs)
        self.writer = writer
        recorder = None
        if self.cfg.data.record_samples:
            recorder = SampleRecorder(self.run_dir, self.rank, self.world, self.step)
        it = iter(self.loader)
        window = _Window()
        code = exit_codes.EXIT_OK
        saved_at = time.monotonic()  # checkpoint.every_minutes counts from the start and from each save
        self.watchdog.start()
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                self.progress.enter("data", self.step + 1)
                batches = [next(it) for _ in range(t.grad_accum)]
                window.wait += time.perf_counter() - t0
                logging = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps
                self._pending_tokens += window.add(batches, counted=self.counts_rows)
                self.flops.add(batches if self.counts_rows else [])
                counts = _LogCounts.pack(self, window) if logging else None
                # The stop request, whether rank 0's clock says a timed save is due (one clock, so every rank
                # decides alike) and on logging steps the counters ride on the step's one collective.
                due = self._timed_save_due(saved_at)
                out = train_step(self.engine, batches, self.grad_divisor, self.device,
                                 shared=[due, *(counts.values if counts else ())], read_grad_norm=logging,
                                 stop_requested=lambda: self.stop.requested, phase=self.progress.enter)
                self.step += 1
                self.progress.step_done(time.perf_counter() - t0)
                if recorder is not None:
                    recorder.record(self.step, batches)
                self._count_nonfinite(out)
                if counts is not None:
                    self._log(writer, out, window, counts.unpack(out.shared[1:]))
                    window = _Window()
                writer.advance(1, None if math.isnan(out.loss) else out.loss)
                if t.val_every and self.step % t.val_every == 0:
                    self.progress.enter("validate")
                    self.validator.run(writer, self.step)
                signalled = out.stop
                sliced = t.stop_at_step is not None and self.step >= t.stop_at_step
                every, timed = self.cfg.checkpoint.every_steps, out.shared[0] > 0
                if signalled or sliced or timed or (every and self.step % every == 0) or self.step == t.max_steps:
                    self.save()
                    saved_at = time.monotonic()
                    # A signal that arrived during the save ends the run on the checkpoint just committed: no step
                    # and no second save after it (the ranks agree, as at a step).
                    if not (signalled or sliced) and self.step < t.max_steps:
                        signalled = self._signalled_during_save()
                if signalled:
                    code = exit_codes.EXIT_PREEMPTED
                    self._mark("PREEMPTED")
                    break
                if sliced:
                    break
            if code == exit_codes.EXIT_OK and self.step >= t.max_steps:
                self._mark("DONE")
            self.watchdog.stop()
            if self.rank == 0:
                owner.release(self.run_dir)
        finally:
            self.watchdog.stop(done=False)  # no-op after a normal end; after an error the record stops moving
            writer.close()
            if recorder is not None:
                recorder.close()
        return code

    def _timed_save_due(self, saved_at: float) -> float:
        """1.0 on rank 0 once checkpoint.every_minutes have passed since `saved_at`, else 0.0 (summed over ranks
        with the step's collective: the decision is rank 0's on every rank)."""
        minutes = self.cfg.checkpoint.every_minutes
        return float(self.rank == 0 and minutes > 0 and time.monotonic() - saved_at >= minutes * 60)

    def _signalled_during_save(self) -> bool:
        """Collective: did a signal reach any rank while it was saving?"""
        (stops,) = distributed.all_reduce_values([1.0 if self.stop.requested else 0.0])
        return stops > 0

    def _count_nonfinite(self, out: StepResult) -> None:
        if not out.nonfinite:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        limit = self.cfg.train.max_nonfinite_in_row
        if self.nonfinite_in_row >= limit:
            raise TrainingStopped(f"{self.nonfinite_in_row} non-finite steps in a row (limit "
                                  f"train.max_nonfinite_in_row={limit}); the last good checkpoint is intact")

    def _mark(self, name: str) -> None:
        """DONE / PREEMPTED in the run directory: what a chained job or `pretrain launch` reads back."""
        if self.rank == 0:
            (self.run_dir / name).write_text(f"{self.step}\n")

    def _log(self, writer: MetricsWriter, out: StepResult, w: _Window, totals: dict) -> None:
        """One metrics line from the counters reduced with the step (`_LogCounts`): no collective of its own."""
        elapsed = time.perf_counter() - w.start
        self.tokens_seen += int(totals["pending"])
        self._pending_tokens = 0
        self._check_bad_fraction(totals["ok"], totals["bad"], totals["reasons_by_source"])
        skipped = totals["reasons"]
        tokens, samples, flops = totals["tokens"], totals["samples"], totals["flops"]
        lrs = {f"lr/{name}": lr for name, lr in out.lrs.items()}
        values = {
            "loss": out.loss, "lr": next(iter(lrs.values())), "grad_norm": out.grad_norm,
            "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
            "mfu": mfu(flops, elapsed, self.world, device_name()), "data_wait_frac": w.wait / elapsed,
            # Achieved model TFLOP/s per rank (the numerator of MFU): comparable across runs, also on CPU.
            "tflops_per_rank": flops / elapsed / self.world / 1e12,
            "step_time_s": elapsed / w.steps, "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_total,
            "skipped": {k: v for k, v in skipped.items() if v},
            "truncated": int(totals["truncated"]),  # samples whose text was cut to data.max_length, so far
        }
        if torch.cuda.is_available():
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:  # the rank's peak resident set (Linux counts ru_maxrss in KiB): a CPU run's memory, for the planner
            values["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        writer.log(self.step, values, trackers_only={**lrs, **{f"data/skipped_{k}": v for k, v in skipped.items()},
                                                     "data/truncated": values["truncated"]})

    def _sync_tokens(self) -> None:
        """Collective: add every rank's tokens since the last sync to tokens_seen."""
        (pending,) = distributed.all_reduce_values([self._pending_tokens])
        self.tokens_seen += int(pending)
        self._pending_tokens = 0

    def _check_bad_fraction(self, ok: list[float], bad: list[float], reasons: list[dict]) -> None:
        d = self.cfg.data
        for i in range(len(ok)):
            seen = ok[i] + bad[i]
            if seen >= d.bad_min_samples and bad[i] / seen > d.max_bad_fraction:
                raise DataSourceError(
                    f"data source {i} ({d.train[i].urls}): {int(bad[i])} of {int(seen)} samples skipped "
                    f"({bad[i] / seen:.1%} > data.max_bad_fraction={d.max_bad_fraction}); reasons: "
                    f"{reasons[i]}. Run `pretrain shards verify` on it.")


class _Window:
    """Counters of the steps since the last log line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait, self.tokens, self.samples, self.steps = 0.0, 0, 0, 0

    def add(self, batches: list[dict], counted: bool = True) -> int:
        """Count one step; returns its (non-padding) tokens on this rank (none when not `counted`: another rank
        of its sequence-parallel group counts them)."""
        self.steps += 1
        if not counted:
            return 0
        tokens = sum(int(b["attention_mask"].numpy().sum()) for b in batches)  # host batch: no device op
        self.tokens += tokens
        self.samples += sum(b["n_samples"] for b in batches)
        return tokens


class _LogCounts:
    """What a metrics line sums over ranks, flattened to numbers that ride on the step's one collective: window
    tokens, samples and FLOPs, tokens since the last sync, per-source ok/skipped samples, and skips per reason over
    the fixed reason list (every rank packs alike; every reason is reported, zeros included, so TensorBoard shows a
    line per reason from the start)."""

    def __init__(self, values: list[float], n_sources: int, reasons_by_source: list[dict]) -> None:
        self.values, self.n_sources, self.reasons_by_source = values, n_sources, reasons_by_source

    @classmethod
    def pack(cls, trainer: Trainer, w: _Window) -> _LogCounts:
        stats = trainer.loader.stats()
        reasons = [0.0] * len(REASONS)
        for d in stats["skipped"]:
            for k, v in d.items():
                reasons[REASONS.index(k) if k in REASONS else -1] += v
        values = [w.tokens, w.samples, trainer.flops.take(), trainer._pending_tokens, stats["truncated"], *stats["ok"],
                  *[sum(s.values()) for s in stats["skipped"]], *reasons]
        return cls([float(v) for v in values], len(stats["ok"]), stats["skipped"])

    def unpack(self, sums: list[float]) -> dict:
        n = self.n_sources
        tokens, samples, flops, pending, truncated = sums[:5]
        ok, bad, reasons = sums[5:5 + n], sums[5 + n:5 + 2 * n], sums[5 + 2 * n:]
        return {"tokens": tokens, "samples": samples, "flops": flops, "pending": pending, "truncated": truncated,
                "ok": ok, "bad": bad,
                "reasons": {k: int(v) for k, v in zip(REASONS, reasons)}, "reasons_by_source": self.reasons_by_source}
