"""Trainer pieces without a training run: the DeepSpeed config merge, LR schedules, the FLOPs meter and MFU, signal
handling, checkpoint write failures, the world-size-change rules, and DataLoader workers under signals."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import islice

import psutil
import pytest
import torch

from pretrain.config import ConfigError, build_config
from pretrain.data.batching import label_count
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.urls import expand_urls
from pretrain.model.flops import VLMShape, step_flops
from pretrain.tokens import IGNORE
from pretrain.train import checkpoint as ckpt
from pretrain.train.ds_config import build_ds_config, optimizer_offloaded
from pretrain.train.resume import SavedRanks
from pretrain.train.schedule import lr_lambda
from pretrain.train.step import FlopsMeter
from pretrain.train.universal import ResumeError, needs_universal

# LLaVA's scripts/zero3.json, as LLaVA users bring it (HF Trainer "auto" values).
LLAVA_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def _cfg(**sections):
    tree = {"model": {"llm": "llm", "vision": "vision"}, "data": {"train": [{"urls": "x.tar"}]},
            "train": {"max_steps": 10}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return build_config(tree)


# -- DeepSpeed config ------------------------------------------------------------------------------------------------
def test_llava_zero3_json_is_the_base_and_ours_win_where_validated(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({**LLAVA_ZERO3, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                "scheduler": {"type": "WarmupLR"}, "gradient_clipping": "auto",
                                "wall_clock_breakdown": True}))
    cfg = _cfg(train={"micro_batch_size": 4, "grad_accum": 3, "grad_clip": 0.5, "precision": "bf16"},
               deepspeed={"config_file": str(path), "zero_stage": 3, "reduce_bucket_size": 1234,
                          "prefetch_bucket_size": 567, "param_persistence_threshold": 89})
    ds = build_ds_config(cfg, world_size=2)
    # Batch, clipping, precision: ours, always (the file's "auto"s and fp16 block do not survive).
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"] == {"enabled": False}
    # Optimizer and scheduler are the trainer's.
    assert "optimizer" not in ds and "scheduler" not in ds
    zero = ds["zero_optimization"]
    # "auto" tuning knobs resolve to our values; the file's explicit values stay.
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (1234, 567, 89)
    assert zero["sub_group_size"] == 1e9 and zero["stage3_max_reuse_distance"] == 1e9
    assert zero["stage3_max_live_parameters"] == 1e9 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["wall_clock_breakdown"] is True  # cosmetic: the file wins over our default
    assert "auto" not in json.dumps(ds)


def test_our_zero_stage_and_offload_win_over_the_file(tmp_path, caplog):
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    cfg = _cfg(deepspeed={"config_file": str(path), "zero_stage": 3, "offload_optimizer": "cpu"})
    ds = build_ds_config(cfg, world_size=1)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["overlap_comm"] is False  # a tuning knob the file set: kept
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and optimizer_offloaded(ds)
    assert "deepspeed.zero_stage=3 is used" in caplog.text
    assert not optimizer_offloaded(build_ds_config(_cfg(), 1))
    assert not optimizer_offloaded({"zero_optimization": {"offload_optimizer": {"device": "none"}}})


def test_overrides_dotted_keys_win_over_everything(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"sub_group_size": 5}, "steps_per_print": 7}))
    cfg = _cfg(deepspeed={"config_file": str(path), "overrides": {
        "zero_optimization.sub_group_size": 11, "gradient_clipping": 2.0, "comms_logger.enabled": True}})
    ds = build_ds_config(cfg, world_size=1)
    assert ds["zero_optimization"]["sub_group_size"] == 11 and ds["gradient_clipping"] == 2.0
    assert ds["comms_logger"] == {"enabled": True} and ds["steps_per_print"] == 7
    assert ds["zero_optimization"]["stage"] == 3  # siblings of an overridden key stay


def test_load_universal_flag_and_file_errors(tmp_path):
    ds = build_ds_config(_cfg(deepspeed={"overrides": {"checkpoint.tag_validation": "Warn"}}), 2, load_universal=True)
    assert ds["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert "checkpoint" not in build_ds_config(_cfg(), 2)
    with pytest.raises(ConfigError, match="not found"):
        build_ds_config(_cfg(deepspeed={"config_file": str(tmp_path / "nope.json")}), 1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(_cfg(deepspeed={"config_file": str(tmp_path / "bad.json")}), 1)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        build_ds_config(_cfg(deepspeed={"config_file": str(tmp_path / "list.json")}), 1)


# -- LR schedules ----------------------------------------------------------------------------------------------------
def test_warmup_then_cosine_linear_constant():
    total, warm, floor = 110, 10, 0.1
    cos, lin, const = (lr_lambda(s, warm, total, floor) for s in ("cosine", "linear", "constant"))
    for fn in (cos, lin, const):
        assert [fn(s) for s in range(warm)] == pytest.approx([(s + 1) / warm for s in range(warm)])
        assert fn(warm) == pytest.approx(1.0)
    assert cos(warm + 50) == pytest.approx(floor + (1 - floor) * 0.5)  # half-way down the cosine
    assert lin(warm + 25) == pytest.approx(floor + (1 - floor) * 0.75)
    assert cos(total) == pytest.approx(floor) and lin(total) == pytest.approx(floor)
    assert cos(total + 30) == pytest.approx(floor)  # past the end: stays at the floor
    assert all(const(s) == 1.0 for s in range(warm, total + 5))
    values = [cos(s) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert lr_lambda("cosine", 0, 10, 0.0)(0) == 1.0  # no warm-up: full rate at once


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="pretrain.train.schedule"):
        fn = lr_lambda("cosine", 65, 10, 0.0)
    assert "warm-up clamped to 10 steps" in caplog.text and "train.warmup_steps (65)" in caplog.text
    assert [fn(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])  # reaches train.lr


def test_schedule_drives_every_param_group_with_its_multiplier():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 2e-3}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", 2, 6, 0.0))
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [s[0] for s in seen] == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert all(s[1] == pytest.approx(2 * s[0]) for s in seen)


# -- FLOPs and MFU ---------------------------------------------------------------------------------------------------
def test_flops_meter_sums_the_flops_model_over_micro_batches(assets, tokenizer):
    from pretrain.config import ModelConfig
    from pretrain.model.build import build_llava_config

    llava = build_llava_config(ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"])), tokenizer)
    shape = VLMShape.from_llava_config(llava, "mlp2x_gelu")
    labels = torch.full((2, 40), IGNORE)
    labels[0, 20:30] = 5
    labels[1, 10:12] = 5
    batch = {"sample_lengths": [[30], [12, 8]], "pixel_values": torch.zeros(3, 3, 8, 8), "labels": labels}
    meter = FlopsMeter.for_model(llava, "mlp2x_gelu", "align")
    want = step_flops(shape, [30, 12, 8], 3, label_count(batch["labels"]), "align").total
    assert label_count(batch["labels"]) == 12 and meter.batch_flops(batch) == pytest.approx(want) and want > 0
    meter.add([batch, {**batch, "pixel_values": None}])
    text_only = step_flops(shape, [30, 12, 8], 0, 12, "align").total
    assert meter.take() == pytest.approx(want + text_only) and meter.take() == 0.0
    assert FlopsMeter(None, "full").batch_flops(batch) == 0.0  # an unknown architecture: no MFU, no crash


def test_mfu_is_null_without_a_known_gpu_and_uses_its_peak():
    from pretrain.model.flops import mfu  # the cost model's one formula, as the trainer calls it

    assert mfu(1e15, 1.0, 8, None) is None  # CPU
    assert mfu(1e15, 1.0, 8, "Some Unknown Accelerator") is None
    assert mfu(0.0, 1.0, 8, "NVIDIA H100 80GB HBM3") is None
    assert mfu(989e12 * 8 * 0.4 * 2.0, 2.0, 8, "NVIDIA H100 80GB HBM3") == pytest.approx(0.4)
    assert mfu(312e12 * 0.5, 1.0, 1, "NVIDIA A100-SXM4-80GB") == pytest.approx(0.5)


# -- signals ---------------------------------------------------------------------------------------------------------
_SIGNAL_SCRIPT = r"""
import os, signal, sys, time
from pathlib import Path
from pretrain.train import signals
signals.REPEAT_WINDOW_S = 0.5
stop = signals.StopRequest(Path(sys.argv[1]))
stop.install()
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGTERM)   # the same event delivered twice (group signal + torchrun): one request
time.sleep(0.1)
print("requested", stop.requested, stop.signal, flush=True)
time.sleep(0.6)
os.kill(os.getpid(), signal.SIGTERM)   # a second request: exit at once
time.sleep(10)
print("still running", flush=True)
"""


@pytest.mark.slow
def test_first_signal_sets_a_request_a_repeat_is_the_same_event_a_second_exits_75(tmp_path):
    marker = tmp_path / "PREEMPTED"
    out = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT, str(marker)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 75, out.stdout + out.stderr
    assert f"requested True {int(signal.SIGUSR1)}" in out.stdout and "still running" not in out.stdout
    assert "second signal" in out.stderr and marker.is_file()


# -- checkpoint write failures ---------------------------------------------------------------------------------------
def _committed(root, step):
    tag = ckpt.tag_for(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "shard.pt").write_bytes(b"x" * 10)
    ckpt.commit(root, tag, {"step": step})
    return tag


def test_a_full_disk_names_the_checkpoint_and_keeps_the_earlier_ones(tmp_path):
    root = tmp_path / "checkpoints"
    good = _committed(root, 2)
    partial = root / ckpt.tag_for(4)
    partial.mkdir()
    (partial / "zero_pp_rank_0_optim_states.pt").write_bytes(b"half")
    err = ckpt.write_failure(root, ckpt.tag_for(4), OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, ckpt.CheckpointWriteError)
    assert "no space left on device" in str(err) and str(partial) in str(err) and good in str(err)
    assert not partial.exists()  # its space given back
    assert ckpt.is_committed(root / good) and (root / "latest").read_text() == good
    # torch.save's opaque error on a full disk: recognised through the chain
    wrapped = RuntimeError("unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert "no space left" in str(ckpt.write_failure(root, ckpt.tag_for(6), wrapped))
    # Any other failure says so, with plenty of room left.
    other = ckpt.write_failure(root, ckpt.tag_for(6), PermissionError(errno.EACCES, "Permission denied"))
    assert "write failed" in str(other) and "no space" not in str(other)
    # torch.save's own wording of a failed write counts when the disk is full; a peer's failure does not.
    assert ckpt._disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288"), free=0)
    assert not ckpt._disk_full(RuntimeError("Connection closed by peer [127.0.0.1]:23968"), free=0)
    # A committed checkpoint is never removed by the failure path.
    assert "write failed" in str(ckpt.write_failure(root, good, RuntimeError("late"))) and (root / good).is_dir()


# -- another world size ----------------------------------------------------------------------------------------------
def test_which_resumes_need_the_universal_format():
    assert not needs_universal({"world_size": 2, "zero_stage": 3}, 2, 3)
    assert needs_universal({"world_size": 2, "zero_stage": 3}, 1, 3)
    assert needs_universal({"world_size": 4, "zero_stage": 2}, 8, 2)
    assert needs_universal({"world_size": 2, "zero_stage": 2}, 2, 3)
    assert not needs_universal({"world_size": 2, "zero_stage": 0}, 4, 0)  # stage 0: every rank holds everything
    with pytest.raises(ResumeError, match="stage 0"):
        needs_universal({"world_size": 2, "zero_stage": 0}, 1, 3)


def _loader(processor, shapes, states=None, **kw):
    # A shuffle buffer of 1: the batches of an epoch hold exactly that epoch's samples (shards are still shuffled).
    spec = LoaderSpec(sources=[expand_urls(shapes["train"]["urls"])], weights=[1.0], shuffle_buffer=1,
                      rows_per_batch=8, max_length=64, **kw)
    return ResumableLoader(spec, processor, states)


def _sample_ids(batches) -> Counter:
    return Counter((k["shard"], k["key"], k["epoch"]) for b in batches for k in b["sample_keys"])


def _rest_of(loader) -> Counter:
    """The samples a resumed loader reads before its first one of epoch 2."""
    got = Counter()
    for batch in loader:
        got += _sample_ids([batch])
        if any(k["epoch"] == 2 for k in batch["sample_keys"]):
            return Counter({k: n for k, n in got.items() if k[2] < 2})
    raise AssertionError("the loader ended")


def test_fewer_ranks_continue_the_rest_of_every_epoch_the_old_ranks_were_in(processor, shapes, tmp_path):
    """2 ranks -> 1: rank 1 had passed into epoch 1 while rank 0 was early in epoch 0. The checkpoint's trainer
    states of both ranks go to the new loader, and it reads exactly what neither old rank had: the rest of epoch 0
    and of epoch 1, each sample once across the two parts, then epoch 2. 2 ranks -> 3: the new ranks share that
    rest exactly."""
    ckpt_dir = tmp_path / "step_00000009"
    ckpt_dir.mkdir()
    consumed = {0: 5, 1: 40}  # batches of 8; an epoch of one rank is 256 samples = 32 batches
    seen = Counter()
    for rank, n in consumed.items():
        old = _loader(processor, shapes, rank=rank, world_size=2)
        seen += _sample_ids(islice(old, n))
        ckpt.write_rank_state(ckpt_dir, rank, {"loader": json.loads(json.dumps(old.state_dict()))})
    assert {e for _, _, e in seen} == {0, 1}  # the case: the old ranks stood in different epochs
    everything = {(s, k) for s, k, _ in _sample_ids(islice(_loader(processor, shapes, shuffle=False), 512 // 8))}
    assert len(everything) == 512
    new = _loader(processor, shapes, states=SavedRanks(ckpt_dir, world=2).part("loader"), rank=0, world_size=1)
    rest = 2 * 512 - sum(seen.values())
    assert rest % 8 == 0
    got = _sample_ids(islice(new, rest // 8 + 1))
    for epoch in (0, 1):
        both = Counter({(s, k): n for (s, k, e), n in (seen + got).items() if e == epoch})
        assert set(both) == everything and set(both.values()) == {1}, epoch  # every sample of it once
    assert [e for _, _, e in got].count(2) == 8  # the batch after the rest opens epoch 2
    # 2 ranks -> 3: each new rank reads its own block of that rest (up to its first sample of epoch 2); the blocks
    # are disjoint, of equal sizes, and together the same rest.
    blocks = [_rest_of(_loader(processor, shapes, states=SavedRanks(ckpt_dir, world=2).part("loader"), rank=rank,
                               world_size=3)) for rank in range(3)]
    assert sum(blocks, Counter()) == Counter({k: n for k, n in got.items() if k[2] < 2})
    assert max(map(sum, map(Counter.values, blocks))) - min(map(sum, map(Counter.values, blocks))) <= 1
    (ckpt_dir / "trainer_rank00001.pt").unlink()  # an old rank's state missing: refused, naming it
    with pytest.raises(ResumeError, match="rank 1 of 2"):
        _loader(processor, shapes, states=SavedRanks(ckpt_dir, world=2).part("loader"), rank=0, world_size=1)


@pytest.mark.slow
def test_dataloader_workers_ignore_cluster_signals(processor, shapes):
    """SIGTERM / SIGUSR1 / SIGINT sent to every process of a job (Slurm does so) leave the DataLoader workers
    serving batches: torch's own worker handler would let a SIGTERM kill them, and then the trainer's step."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    loader = _loader(processor, shapes, num_workers=2)
    it = iter(loader)
    first = list(islice(it, 2))
    workers = [p for p in me.children() if p.pid not in before]
    assert len(workers) == 2
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        for w in workers:
            w.send_signal(sig)
    time.sleep(1.0)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    more = list(islice(it, 8))  # both workers keep producing (batches alternate between them)
    assert len(more) == 8 and all(b["input_ids"].shape[0] == 8 for b in first + more)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    it.close()
