"""`pretrain bench data` in its tiny CPU mode (so it never rots; `bench train --peer` runs end to end in the
gpu_bench rehearsal, tests/bench/test_gpu_bench.py), and the pieces the figures rest on: the
common-practice path does the same work as ours, generated shards, throughput arithmetic, the peer's DS config."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from helpers.runs import write_config

from pretrain.bench.common_practice import LlavaShardDataset, LlavaStyleSample, llava_collate
from pretrain.bench.inputs import ensure_bench_shards, write_bench_shards
from pretrain.bench.peer import llava_ds_config
from pretrain.bench.train import summarize
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.model.flops import flops_per_sample, peak_flops
from pretrain.model.processing import build_processing
from pretrain.plan.shapes import model_shape

SIZES = "72x48,48x64"


@pytest.fixture(scope="module")
def config(tmp_path_factory, assets, shapes):
    root = tmp_path_factory.mktemp("bench")
    return write_config(root / "config.yaml", assets, shapes, **{"run.name": "tiny"})


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_data_tiny(capsys, config, tmp_path):
    """Generates its JPEG shards, measures the three paths, and records the table with its provenance."""
    urls = f"{tmp_path}/data/shard-{{000000..000001}}.tar"
    results = tmp_path / "RESULTS.md"
    code = main(["bench", "data", "--config", str(config), "--samples-per-shard", "12", "--image-sizes", SIZES,
                 "--seconds", "0.3", "--warmup", "0.1", "--rounds", "1", "--workers", "0", "--work-dir",
                 str(tmp_path / "work"), "--json", "--record", str(results), f"data.train.0.urls={urls}"])
    assert code == 0
    out = _last_json(capsys)
    result = out["data"]
    assert set(result) == {"ours", "ours-fast", "common", "anyres-ours", "anyres-hf"}
    # The AnyRes rows tile for real: 72x48 and 48x64 images take grids beyond 1x1 (+ the base) on both paths.
    assert result["anyres-ours"]["tokens_per_sample"] > 2 and result["anyres-hf"]["tokens_per_sample"] > 2
    assert result["anyres-ours"]["per_core_vs_common"] == pytest.approx(
        result["anyres-ours"]["samples_per_cpu_s"] / result["anyres-hf"]["samples_per_cpu_s"])
    # What one rank's workers deliver against what the model eats on the target GPU at 50% MFU.
    gpu = out["gpu"]
    assert gpu["gpu"] == "h100" and gpu["delivered_samples_per_s"] == result["ours"]["samples_per_s"]
    shape = model_shape(load_config(config).model)
    flops = flops_per_sample(shape, round(result["ours"]["tokens_per_sample"]), images=1, stage="full").total
    assert gpu["consumed_samples_per_s"] == pytest.approx(0.5 * peak_flops("h100") / flops)
    assert gpu["delivered_vs_consumed"] == pytest.approx(gpu["delivered_samples_per_s"] / gpu["consumed_samples_per_s"])
    assert all(r["samples"] > 0 and r["samples_per_cpu_s"] > 0 for r in result.values())
    for name in ("ours", "ours-fast"):  # each path's per-core rate against the baseline's, as the table says
        r = result[name]
        assert r["per_core_vs_common"] == pytest.approx(r["samples_per_cpu_s"] / result["common"]["samples_per_cpu_s"])
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["num_samples"] == 24
    text = results.read_text()
    assert text.index("## Data loading: `pretrain bench data`") < text.index("### bench data: config.yaml")
    assert "webdataset + HF processor + tokenizer" in text and "- commit: " in text and "--seconds 0.3" in text
    assert "GPU demand (h100, 50% MFU" in text


def test_common_practice_does_the_same_work(config, shapes, tmp_path):
    """The baseline's sample equals ours token for token, and its pixels equal the processor-exact transform:
    the benchmark compares speed, not different work."""
    cfg = load_config(config)
    processing = build_processing(cfg)
    shards = write_bench_shards(tmp_path, 1, 6, ((72, 48), (48, 64)))
    make = LlavaStyleSample(processing.image_processor, processing.tokenizer, processing.image_token_id,
                            processing.image_tokens, cfg.data.max_length)
    dataset = LlavaShardDataset(shards, make)
    with tarfile.open(shards[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert len(dataset) == 6
    for i in range(6):
        parts = {ext: members[f"bench-{i:08d}.{ext}"] for ext in ("jpg", "json", "txt")}
        ours = processing.processor(parts)
        theirs = dataset[i]
        assert theirs["input_ids"].tolist() == ours.input_ids and theirs["labels"].tolist() == ours.labels
        assert torch.allclose(theirs["pixel_values"], ours.pixel_values, atol=1e-5)
    batch = llava_collate(processing.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["attention_mask"].sum() == len(dataset[0]["input_ids"]) + len(dataset[1]["input_ids"])


def test_bench_shards_only_fill_a_complete_missing_set(tmp_path):
    urls = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(2)]
    assert ensure_bench_shards(urls, 3, ((40, 30),)) is True
    assert ensure_bench_shards(urls, 3, ((40, 30),)) is False  # present: used as they are
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing shards"):
        ensure_bench_shards(urls, 3, ((40, 30),))
    with pytest.raises(FileNotFoundError, match="missing shards"):
        ensure_bench_shards([str(tmp_path / "other" / "mine.tar")], 3)


def test_summary_weighs_steps_by_time():
    records = [{"step": 1, "step_time_s": 10.0, "tokens_per_s": 1.0, "samples_per_s": 1.0, "data_wait_frac": 0.9},
               {"step": 2, "step_time_s": 1.0, "tokens_per_s": 100.0, "samples_per_s": 4.0, "data_wait_frac": 0.0,
                "flops": 4e12},
               {"step": 3, "step_time_s": 3.0, "tokens_per_s": 300.0, "samples_per_s": 4.0, "data_wait_frac": 0.1,
                "flops": 4e12}]
    out = summarize(records, warmup=1, nproc=2, device="NVIDIA H100 80GB HBM3")
    assert out["tokens_per_s"] == pytest.approx(1000 / 4)
    assert out["samples_per_step"] == pytest.approx(8.0)
    assert out["data_wait_frac"] == pytest.approx(0.3 / 4)
    assert out["mfu"] == pytest.approx(8e12 / (4 * 2 * 989e12))
    assert summarize(records, 1, 2, "cpu")["mfu"] is None
    # Beside the totals, the median step: a slow step (a recompilation in the window) cannot wreck it.
    slow = [*records, {**records[1], "step": 4, "step_time_s": 40.0, "tokens_per_s": 2.5}]
    out = summarize(slow, warmup=1, nproc=2, device="NVIDIA H100 80GB HBM3")
    assert out["total_time_s"] == pytest.approx(44.0) and out["median"]["step_time_s"] == pytest.approx(3.0)
    assert out["median"]["tokens_per_s"] == pytest.approx(100.0)
    assert out["median"]["mfu"] == pytest.approx(4e12 / (3.0 * 2 * 989e12))
    assert out["mfu"] == pytest.approx(12e12 / (44 * 2 * 989e12))


def test_peer_uses_llavas_zero_config_at_our_stage(config):
    cfg = load_config(config, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu"])
    ds = llava_ds_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["optimizer"]["type"] == "AdamW"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # transformers fills it in, as for LLaVA users
    assert "optimizer" not in llava_ds_config(load_config(config, ["deepspeed.zero_stage=2"]))


def test_plan_vs_measured_table():
    """pretrain.bench.plan_table (what tools/bench_table.py prints, gpu_bench.sh last): the plan for the measured
    sample length at the measured MFU, at 40%, and its memory next to the measured peak."""
    from helpers.runs import ROOT

    from pretrain.bench import plan_table

    ours = {"tokens_per_s": 40000.0, "samples_per_s": 80.0, "data_wait_frac": 0.01, "mfu": 0.3, "gpu_mem_gib": 20.0}
    result = {"train": {"nproc": 1, "device": "NVIDIA H100 80GB HBM3", "ours": ours},
              "environment": {"command": f"pretrain bench train --config {ROOT}/configs/bench/small.yaml --steps 9"}}
    row = dict(zip(plan_table.HEADER, plan_table.row(result)))
    assert row["recipe"] == "small" and row["MFU"] == "30.0%" and row["peer tok/s"] is None
    assert row["plan tok/s @ measured MFU"] == pytest.approx(row["plan tok/s @ 40%"] * 0.3 / 0.4, rel=1e-6)
    assert 1 < row["plan GiB"] < 80
    assert float(row["plan/measured GiB"]) == pytest.approx(row["plan GiB"] / 20.0, abs=0.01)
    assert plan_table.table([result]).splitlines()[2].startswith("| small | NVIDIA H100 80GB HBM3 | 40,000 | 30.0% |")
