"""`pretrain plan --calibrate` and the terms the step/memory model gained: the least-squares fit, padding from a
length distribution, collective calls, DeepSpeed's memory terms, the JSON it prints and its errors. Arithmetic only:
the run directories here are written by hand, no step is timed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pretrain.cli import main
from pretrain.config import ConfigError, DeepSpeedConfig, load_config
from pretrain.model.flops import count_params
from pretrain.plan.calibrate import fit_memory_overhead, fit_step_time, read_run
from pretrain.plan.comm import collective_calls
from pretrain.plan.estimate import GIB, memory_per_gpu
from pretrain.plan.lengths import SampleCost, batch_mix
from pretrain.plan.planner import workload

TINY_MODEL = {
    "llm": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
    "vision": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "vision_feature_select_strategy": "full",
}
RATE, CALL, FIXED = 2e9, 3e-4, 0.05  # the "hardware" the hand-written runs measured


def recipe(tmp_path: Path, model: dict, **sections) -> Path:
    tree = {"model": model, "data": {"train": [{"urls": "shards/train-{000000..000001}.tar"}], "max_length": 256},
            "train": {"max_steps": 10, "stage": "finetune"}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_fit_recovers_the_coefficients_and_never_goes_negative():
    rows = [(1e9, 100, 1), (3e9, 100, 1), (2e9, 300, 1), (5e9, 250, 1)]
    seconds = [f / RATE + c * CALL + FIXED for f, c, _ in rows]
    fit = fit_step_time(rows, seconds)
    assert fit.fitted == ("seconds_per_flop", "call_s", "fixed_step_s")
    assert (fit.flops_per_s, fit.call_s, fit.fixed_step_s) == pytest.approx((RATE, CALL, FIXED), rel=1e-6)
    assert fit.rms_s == pytest.approx(0, abs=1e-9)
    # Two configs cannot tell a per-call cost from a per-step one: one of them is fitted, on the calls.
    two = fit_step_time(rows[:2], seconds[:2])
    assert two.fitted == ("seconds_per_flop", "call_s") and two.fixed_step_s == 0
    assert two.predict(rows[1]) == pytest.approx(seconds[1])
    # Steps that get faster with more calls would need a negative call cost: that coefficient is dropped.
    neg = fit_step_time([(1e9, 100, 1), (2e9, 300, 1), (3e9, 100, 1)], [1.0, 1.0, 2.0])
    assert neg.call_s >= 0 and neg.fixed_step_s >= 0 and neg.flops_per_s > 0
    with pytest.raises(ConfigError, match="do not grow with their FLOPs"):
        fit_step_time([(1e9, 1, 1), (2e9, 1, 1)], [0.0, 0.0])
    assert fit_memory_overhead([1.0, 2.0], [1.5, 2.7]) == pytest.approx(0.6)


def test_padding_waste_and_text_only_share_come_from_the_lengths(tmp_path):
    samples = [SampleCost(10, 1, 4), SampleCost(30, 0, 20)] * 4
    # Pad to longest: rows of 10 and 30 tokens pad to 32 (a multiple of 8) -> 64 positions hold 40 tokens.
    unpacked = batch_mix(samples, 2, 64, packing=False)
    assert (unpacked.rows, unpacked.padded_tokens, unpacked.tokens) == (2, 64, 40)
    assert unpacked.padding_waste == pytest.approx(1 - 40 / 64)
    assert unpacked.dense_pairs == 2 * 32**2 and unpacked.sample_pairs == 10**2 + 30**2
    assert unpacked.text_only_fraction == 0.5 and unpacked.images == 1 and unpacked.labels == 24
    # Packed into rows of 40: each row holds one 10 and one 30, no padding left.
    packed = batch_mix(samples, 2, 40, packing=True)
    assert (packed.padded_tokens, packed.tokens, packed.samples) == (80, 80, 4)
    assert packed.padding_waste == 0
    # The padded positions are what the hardware's FLOPs are priced on; the model FLOPs count only the tokens.
    cfg = load_config(recipe(tmp_path, TINY_MODEL))
    work = replace(workload(cfg, samples=samples), micro_batch=2, seq_len=64, packing=False)
    assert work.hardware_flops() > work.micro_flops().total * 1.4
    assert work.micro_flops().tokens == 40


def test_collective_calls_count_gathers_per_call_and_recompute(tmp_path):
    cfg = load_config(recipe(tmp_path, TINY_MODEL, train={"max_steps": 1, "stage": "full"}))
    ds = DeepSpeedConfig(param_persistence_threshold=0, reduce_bucket_size=10**12)
    work = workload(cfg)
    base = collective_calls(work, ds, 2)
    # Every module with weights is gathered in forward and again in backward (full: everything trains), plus one
    # gradient bucket.
    modules = {name.rsplit(".", 1)[0] for name, _ in work.shape.tensors()}
    assert base == 2 * len(modules) + 1
    layer_modules = {m for m in modules if m.startswith("llm.") and ".layers." in m}
    ckpt = collective_calls(replace(work, checkpointing="full"), ds, 2)
    assert ckpt - base == len(layer_modules) + len({m for m in modules if m.startswith("vision.") and ".layers."
                                                     in m})
    assert collective_calls(replace(work, grad_accum=3), ds, 2) == 3 * base
    # align with the frozen tower as a replica: the tower is never gathered, the frozen decoder once per step.
    align = collective_calls(replace(work, stage="align"), ds, 2)
    llm = {m for m in modules if m.startswith("llm.")}
    proj = {m for m in modules if m.startswith("projector.")}
    assert align == 2 * len(proj) + len(llm) + 1


def test_deepspeed_memory_terms(tmp_path):
    cfg = load_config(recipe(tmp_path, TINY_MODEL, train={"max_steps": 1, "stage": "align"}))
    work = workload(cfg)
    counts = count_params(work.shape)
    kept = DeepSpeedConfig(zero_stage=3, frozen_unpartitioned=True, overrides={"zero_optimization.sub_group_size": 7})
    gathered = kept.model_copy(update={"frozen_unpartitioned": False})
    m, g = memory_per_gpu(work, kept, 4), memory_per_gpu(work, gathered, 4)
    pb = 4 if work.precision == "fp32" else 2
    assert m.replica == pb * counts.vision and g.replica == 0  # the frozen tower's replica, whole on every rank
    # The frozen decoder held gathered for the step; one sub-group's fp32 gradients (7 elements here).
    assert m.buffers - g.buffers == pytest.approx(pb * counts.llm * 3 / 4)
    wide = memory_per_gpu(work, gathered.model_copy(update={"overrides": {}}), 4)
    assert g.buffers - wide.buffers == pytest.approx(4 * 7 - 4 * counts.trainable("align") / 4)
    assert m.total == pytest.approx(m.params + m.grads + m.optimizer + m.activations + m.buffers + m.overhead
                                    + m.replica)


def _run_dir(root: Path, name: str, cfg_path: Path, overrides: list[str], world: int, memory: float | None) -> Path:
    """A run directory as the trainer writes it, its steps taking what the hand-set hardware makes of its work."""
    from pretrain.plan.calibrate import step_features

    cfg = load_config(cfg_path, overrides)
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    t = cfg.train
    (d / "ds_config.json").write_text(json.dumps({
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        "train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum}))
    flops, calls, one = step_features(workload(cfg), cfg, world)
    seconds = flops / RATE + calls * CALL + FIXED * one
    lines = [{"step": s, "loss": 1.0, "step_time_s": seconds * (3 if s == 1 else 1), "tokens_per_s": 1.0}
             | ({} if memory is None else {"host_peak_rss_gib": memory}) for s in range(1, 5)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


def test_calibrated_json_predicts_the_config_at_its_world_size(tmp_path, capsys):
    path = recipe(tmp_path, TINY_MODEL, train={"max_steps": 10, "stage": "full"}, deepspeed={"zero_stage": 3})
    runs = [_run_dir(tmp_path, "a", path, ["train.micro_batch_size=1"], 1, 1.25),
            _run_dir(tmp_path, "b", path, ["train.micro_batch_size=4", "model.activation_checkpointing=full"], 1,
                     None),
            _run_dir(tmp_path, "c", path, ["train.micro_batch_size=2", "train.grad_accum=2"], 1, 1.5)]
    target = ["train.micro_batch_size=3", "model.activation_checkpointing=full", "train.grad_accum=2"]
    # Quantile 1: each run's slowest step after the first, which is start-up (three times longer) and dropped.
    assert main(["plan", str(path), *target, "--json", "--length-samples", "0", "--step-quantile", "1",
                 "--calibrate", *map(str, runs)]) == 0
    out = json.loads(capsys.readouterr().out)
    c = out["calibrated"]
    assert c["world_size"] == 1  # no global batch: the runs' world size
    k = c["coefficients"]
    assert (k["flops_per_s"], k["call_s"], k["fixed_step_s"]) == pytest.approx((RATE, CALL, FIXED), rel=1e-6)
    from pretrain.plan.calibrate import step_features

    cfg = load_config(path, target)
    flops, calls, _ = step_features(workload(cfg), cfg, 1)
    assert c["step_time_s"] == pytest.approx(flops / RATE + calls * CALL + FIXED, rel=1e-6)
    # Memory: the model's bytes plus the runtime's, fitted to the two runs that recorded a peak.
    model = [memory_per_gpu(workload(load_config(path, o)), cfg.deepspeed, 1, 0).total / GIB
             for o in (["train.micro_batch_size=1"], ["train.micro_batch_size=2", "train.grad_accum=2"])]
    overhead = ((1.25 - model[0]) + (1.5 - model[1])) / 2
    assert k["memory_overhead_gib"] == pytest.approx(overhead)
    assert c["peak_memory_gib"] == pytest.approx(memory_per_gpu(workload(cfg), cfg.deepspeed, 1, 0).total / GIB
                                                 + overhead)
    assert out["mfu_source"].startswith("calibrated on 3 run(s)")
    # A fixed global batch sets the world size; without any recorded memory there is no memory prediction.
    bare = [_run_dir(tmp_path, n, path, o, 1, None) for n, o in (("d", ["train.micro_batch_size=1"]),
                                                                  ("e", ["train.micro_batch_size=4"]))]
    assert main(["plan", str(path), "train.global_batch_size=8", "--json", "--length-samples", "0",
                 "--calibrate", *map(str, bare)]) == 0
    again = json.loads(capsys.readouterr().out)["calibrated"]
    assert again["world_size"] == 8 and "peak_memory_gib" not in again


def test_uncalibrated_report_names_the_assumed_mfu_and_its_source(tmp_path, capsys):
    path = recipe(tmp_path, TINY_MODEL)
    assert main(["plan", str(path), "--length-samples", "0"]) == 0
    text = capsys.readouterr().out
    assert "MFU 0.4 x peak, assumed, not measured" in text and "PaLM" in text
    assert main(["plan", str(path), "--json", "--mfu", "0.3", "--length-samples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["mfu_source"] == "given (--mfu)"


def test_a_run_dir_without_metrics_is_a_clear_error(tmp_path, capsys):
    path = recipe(tmp_path, TINY_MODEL)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text(path.read_text())
    assert main(["plan", str(path), "--calibrate", str(empty)]) == 2
    assert f"--calibrate {empty}: no metrics.jsonl" in capsys.readouterr().err
    (empty / "ds_config.json").write_text("{}")
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "step_time_s": 0.5}) + "\n")
    with pytest.raises(ConfigError, match="1 logged step.*warm-up"):
        read_run(empty)
    assert main(["plan", str(path), "--calibrate", str(empty), "--mfu", "0.5"]) == 2
