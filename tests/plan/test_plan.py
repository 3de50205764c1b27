"""`pretrain plan`: the ZeRO memory/communication formulas against hand numbers, their monotonicities, the CLI on a
tiny inline recipe, on hub-id recipes (resolved offline) and on every shipped recipe."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from pretrain.cli import main
from pretrain.cli.plan import render
from pretrain.config import ConfigError, DeepSpeedConfig, load_config
from pretrain.model.components import KNOWN_CONFIGS
from pretrain.model.flops import count_params
from pretrain.plan import (
    GPUS,
    Cluster,
    Workload,
    estimate_step,
    make_plan,
    memory_per_gpu,
    model_shape,
)
from pretrain.plan.planner import config_world_size, stage_variant

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
# Published sizes: Qwen2.5-7B, CLIP ViT-L/14-336 vision tower; the projector is 1024->3584, GELU, 3584->3584.
QWEN7B, CLIP336 = 7_615_616_512, 303_507_456
PROJ = 1024 * 3584 + 3584 + 3584 * 3584 + 3584

TINY_MODEL = {
    "llm": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
    "vision": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "vision_feature_select_strategy": "full",
}


def recipe(tmp_path: Path, model: dict, **sections) -> Path:
    tree = {"model": model, "data": {"train": [{"urls": "shards/train-{000000..000001}.tar"}], "max_length": 256},
            "train": {"max_steps": 10, "stage": "finetune"}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def qwen7b_clip_work(tmp_path: Path, stage: str = "finetune", **kw) -> Workload:
    cfg = load_config(recipe(tmp_path, {"llm": "Qwen/Qwen2.5-7B-Instruct",
                                        "vision": "openai/clip-vit-large-patch14-336"}))
    return Workload(shape=model_shape(cfg.model), stage=stage, seq_len=2048, sample_len=640, logit_tokens=64, **kw)


def test_model_states_follow_the_zero_paper(tmp_path):
    work = qwen7b_clip_work(tmp_path)
    total, trainable = QWEN7B + CLIP336 + PROJ, QWEN7B + PROJ
    assert count_params(work.shape).total == total
    ds = DeepSpeedConfig(param_persistence_threshold=0)
    expect = {  # stage: (params, grads, optimizer) bytes per GPU at N = 8, bf16 + Adam (K = 12)
        0: (2 * total, 2 * trainable, 12 * trainable),
        1: (2 * total, 2 * trainable, 12 * trainable / 8),
        2: (2 * total, 2 * trainable / 8, 12 * trainable / 8),
        3: (2 * total / 8, 2 * trainable / 8, 12 * trainable / 8),
    }
    for stage, (params, grads, optim) in expect.items():
        m = memory_per_gpu(work, stage_variant(ds, stage), 8)
        assert (m.params, m.grads, m.optimizer) == pytest.approx((params, grads, optim)), stage
    # Offloading the optimizer moves its state (and, from stage 2, the fp32 gradient partitions) to the host.
    off = memory_per_gpu(work, stage_variant(ds, 3).model_copy(update={"offload_optimizer": "cpu"}), 8)
    assert off.optimizer == 0 and off.grads == 0
    assert off.host == pytest.approx(12 * trainable / 8 + 4 * trainable / 8)
    # Frozen parts carry weights only: in align only the projector has gradients and optimizer state.
    align = memory_per_gpu(replace(work, stage="align"), stage_variant(ds, 0), 8)
    assert (align.grads, align.optimizer) == (2 * PROJ, 12 * PROJ)


def test_memory_monotonicities(tmp_path):
    work = qwen7b_clip_work(tmp_path, stage="full", micro_batch=2)
    ds = DeepSpeedConfig()
    totals = [memory_per_gpu(work, stage_variant(ds, s), 16).total for s in range(4)]
    assert totals[3] < totals[2] < totals[1] < totals[0]
    zero3 = [memory_per_gpu(work, ds, n).total for n in (1, 8, 64, 512, 4096)]
    assert all(a > b for a, b in zip(zero3, zero3[1:]))
    acts = [memory_per_gpu(replace(work, checkpointing=c), ds, 8).activations for c in ("none", "every_k", "full")]
    assert acts[0] > acts[1] > acts[2]
    assert memory_per_gpu(replace(work, stage="align"), ds, 8).activations < acts[0]


def test_communication_per_step(tmp_path):
    work = qwen7b_clip_work(tmp_path, stage="full")
    psi, ring = QWEN7B + CLIP336 + PROJ, 7 / 8
    cluster = Cluster(GPUS["h100"])
    by_stage = {s: estimate_step(work, stage_variant(DeepSpeedConfig(), s), 8, cluster) for s in range(4)}
    # ZeRO-1/2: reduce-scatter + all-gather = 2 x Psi (bf16) per step; ZeRO-3 adds a weight all-gather: 3 x Psi.
    assert by_stage[1].comm_bytes == pytest.approx(2 * psi * 2 * ring)
    assert by_stage[3].comm_bytes == pytest.approx(1.5 * by_stage[2].comm_bytes)
    # Stage 2 and 3 communicate in every micro-step; stage 1 once per step.
    accum4 = {s: estimate_step(replace(work, grad_accum=4), stage_variant(DeepSpeedConfig(), s), 8, cluster)
              for s in (1, 2, 3)}
    assert accum4[1].comm_bytes == by_stage[1].comm_bytes
    assert accum4[2].comm_bytes == pytest.approx(by_stage[2].comm_bytes / 2 * 5)
    assert accum4[3].comm_bytes == pytest.approx(4 * by_stage[3].comm_bytes)
    one = estimate_step(work, DeepSpeedConfig(), 1, cluster)
    assert one.comm_bytes == 0 and one.exposed_comm_s == 0
    # Beyond one node the link is the network, and the required bandwidth is bytes over compute time.
    big = estimate_step(work, DeepSpeedConfig(), 64, Cluster(GPUS["h100"], net_Bps=25e9))
    assert big.link_Bps == 25e9 and big.need_Bps == pytest.approx(big.comm_bytes / big.compute_s)


def test_step_time_and_time_to_tokens(tmp_path):
    work = qwen7b_clip_work(tmp_path, micro_batch=2, grad_accum=3)
    cluster = Cluster(GPUS["h100"], mfu=0.5)
    est = estimate_step(work, DeepSpeedConfig(), 1, cluster)
    flops = work.micro_flops().total * 3
    assert est.step_s == pytest.approx(flops / (0.5 * 989e12))
    assert est.tokens_per_step == 2 * 3 * 2048
    assert est.hours_for(1e9) == pytest.approx(1e9 / est.tokens_per_step * est.step_s / 3600)
    assert est.effective_mfu(989e12) == pytest.approx(0.5)
    offload = estimate_step(work, DeepSpeedConfig(offload_optimizer="cpu"), 1, cluster)
    assert offload.offload_s > 0 and offload.step_s == pytest.approx(est.step_s + offload.offload_s)
    # A fixed global batch that does not split over the cluster is reported as infeasible, not rounded.
    fixed = replace(work, global_batch=48, grad_accum=1)
    at8 = estimate_step(fixed, DeepSpeedConfig(), 8, cluster)
    assert (at8.micro_batch, at8.grad_accum, at8.global_rows) == (2, 3, 48)
    at16 = estimate_step(fixed, DeepSpeedConfig(), 16, cluster)  # 3 rows per GPU: micro-batch 2 would not divide
    assert (at16.micro_batch, at16.grad_accum) == (1, 3)
    assert estimate_step(fixed, DeepSpeedConfig(), 32, cluster) is None



def test_sequence_parallel_splits_the_work_and_pays_its_all_to_alls(tmp_path):
    """4 data-parallel ranks x Ulysses over 2 against 4 ranks alone, on the same global batch of 16k-token rows:
    the same rows and tokens per step, half the FLOPs and activations per GPU, plus the all-to-all bytes."""
    work = replace(qwen7b_clip_work(tmp_path, micro_batch=1, grad_accum=2), seq_len=16384)
    split = replace(work, sequence_parallel=2)
    cluster, ds = Cluster(GPUS["h100"], mfu=0.5), DeepSpeedConfig()
    alone, shared = estimate_step(work, ds, 4, cluster), estimate_step(split, ds, 8, cluster)
    assert (shared.global_rows, shared.tokens_per_step) == (alone.global_rows, alone.tokens_per_step) == (8, 8 * 16384)
    assert shared.flops_per_gpu == pytest.approx(alone.flops_per_gpu / 2)
    assert shared.compute_s == pytest.approx(alone.compute_s / 2)
    assert shared.memory.activations == pytest.approx(alone.memory.activations / 2)
    llm = work.shape.llm  # q, k, v out and the attention output back, forward and backward, 1 of 2 halves away
    a2a = 2 * llm.layers * (16384 / 2) * 2 * (2 * llm.q_dim + 2 * llm.kv_dim) / 2
    assert split.all_to_all_bytes() == pytest.approx(a2a) and work.all_to_all_bytes() == 0
    assert shared.exposed_comm_s >= 2 * a2a / cluster.link_Bps(2)
    assert estimate_step(split, ds, 7, cluster) is None  # 7 ranks do not make groups of 2
    cfg = load_config(recipe(tmp_path, TINY_MODEL, deepspeed={"sequence_parallel_size": 2},
                             train={"max_steps": 10, "stage": "finetune", "global_batch_size": 8}))
    assert make_plan(cfg, n_gpus=8).work.sequence_parallel == 2
    assert config_world_size(cfg) == 16  # micro-batch 1: 8 data-parallel ranks, each a group of 2

def test_cli_tiny_inline_recipe(tmp_path, capsys):
    path = recipe(tmp_path, TINY_MODEL, deepspeed={"zero_stage": 3})
    assert main(["plan", str(path), "--gpus", "4", "--json", "--mfu", "0.3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [row["n_gpus"] for row in out["scaling"]] == [4] + [2**k for k in range(3, 13)]
    assert out["mfu"] == 0.3 and out["zero_stage"] == 3 and out["stage"] == "finetune"
    assert set(out["memory_gib_by_zero_stage"]) == {"0", "1", "2", "3"}
    assert out["workload"]["image_tokens"] == 16 and out["workload"]["row_tokens"] == 256
    assert all(row["fits"] and row["hours"] > 0 for row in out["scaling"])

    assert main(["plan", str(path), "deepspeed.zero_stage=1", "--gpus", "16", "--gpu", "a100"]) == 0
    text = capsys.readouterr().out
    assert "scaling at ZeRO-1" in text and "A100" in text and "memory per GPU at 16 GPUs" in text
    assert text.splitlines()[-1].split()[0] == "4096"


@pytest.mark.parametrize("gpu", ["a100-40gb", "a100-80gb", "h100", "h200", "l40s", "mi300x", "b200"])
def test_every_gpu_of_the_table_plans_with_the_peak_of_the_flops_table(tmp_path, capsys, gpu):
    from pretrain.model.flops import PEAK_FLOPS

    path = recipe(tmp_path, TINY_MODEL, deepspeed={"zero_stage": 3})
    assert main(["plan", str(path), "--gpus", "8", "--gpu", gpu]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert GPUS[gpu].peak_flops == PEAK_FLOPS[gpu] and f"{PEAK_FLOPS[gpu] / 1e12:.0f} TFLOP/s" in header
    assert f"{GPUS[gpu].memory_bytes / 2**30:.1f} GiB" in header


def test_cli_errors_name_the_problem(tmp_path, capsys):
    path = recipe(tmp_path, TINY_MODEL)
    assert main(["plan", str(path), "train.stge=full"]) == 2
    assert "train.stge" in capsys.readouterr().err
    bad = recipe(tmp_path, {**TINY_MODEL, "llm": {**TINY_MODEL["llm"], "model_type": "gpt2"}})
    assert main(["plan", str(bad)]) == 2
    assert "gpt2" in capsys.readouterr().err
    missing = recipe(tmp_path, {**TINY_MODEL, "llm": str(tmp_path / "no-such-dir")})
    assert main(["plan", str(missing)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_local_directory_config(tmp_path):
    AutoConfig.for_model("llama", **{k: v for k, v in TINY_MODEL["llm"].items() if k != "model_type"}
                         ).save_pretrained(tmp_path / "llm")
    cfg = load_config(recipe(tmp_path, {**TINY_MODEL, "llm": str(tmp_path / "llm")}))
    shape = model_shape(cfg.model)
    assert shape.llm.hidden == 64 and not shape.llm.qkv_bias  # a llama now, read from the directory


@pytest.mark.parametrize("llm,vision,total", [
    ("lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336", 7_062_902_784),  # LLaVA-1.5-7B
    ("Qwen/Qwen2.5-7B-Instruct", "openai/clip-vit-large-patch14-336", QWEN7B + CLIP336 + PROJ),
    ("Qwen/Qwen2.5-1.5B-Instruct", "google/siglip-so400m-patch14-384",
     1_543_714_304 + 428_225_600 + 1152 * 1536 + 1536 + 1536 * 1536 + 1536),
])
def test_hub_id_recipes_resolve_offline(tmp_path, capsys, llm, vision, total):
    path = recipe(tmp_path, {"llm": llm, "vision": vision}, train={"max_steps": 1, "stage": "align"},
                  data={"train": [{"urls": "x.tar"}], "max_length": 2048, "packing": True})
    assert count_params(model_shape(load_config(path).model)).total == total
    assert main(["plan", str(path), "--gpus", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["total"] == total


SHIPPED = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


def _resolvable(spec: str | dict) -> bool:
    return isinstance(spec, dict) or spec in KNOWN_CONFIGS or (ROOT / spec).is_dir()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_plan(name, capsys, monkeypatch, assets):
    """Every shipped recipe plans. The demo recipe names local model directories that `pretrain demo` writes: it is
    planned with the test's tiny models in their place, and with a missing directory it is a config error."""
    monkeypatch.chdir(ROOT)  # recipes name local directories relative to the repository root
    model = load_config(ROOT / name).model
    local = [k for k in ("llm", "vision") if not _resolvable(getattr(model, k)) or name == "configs/demo.yaml"]
    assert local == (["llm", "vision"] if name == "configs/demo.yaml" else []), local
    fill = [f"model.{k}={assets['llama' if k == 'llm' else 'clip']}" for k in local]
    rc = main(["plan", name, *fill, "--gpus", "8"])
    out, err = capsys.readouterr()
    assert rc == 0 and "scaling at ZeRO-" in out, err
    if local:
        rc = main(["plan", name, f"model.llm={ROOT / 'no-such-model-dir'}", "--gpus", "8"])
        assert rc == 2 and "is not a directory" in capsys.readouterr().err


def test_shipped_recipes_include_the_lead_recipes():
    assert {"configs/llava15_stage1.yaml", "configs/llava15_stage2.yaml", "configs/qwen25_siglip.yaml",
            "configs/bench/small.yaml", "configs/bench/mid.yaml", "configs/bench/large.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name,llm,vision,tokens_per_row", [
    ("small", 494_032_768, 92_884_224, 2048),
    ("mid", 1_543_714_304, 428_225_600, 4096),
    ("large", 6_738_415_616, CLIP336, 2048),
])
def test_bench_recipes(name, llm, vision, tokens_per_row):
    cfg = load_config(ROOT / "configs" / "bench" / f"{name}.yaml")
    counts = count_params(model_shape(cfg.model))
    assert (counts.llm, counts.vision) == (llm, vision)
    plan = make_plan(cfg, n_gpus=1, gpu="h100")
    assert plan.work.row_tokens == tokens_per_row and plan.work.packing
    one = plan.scaling[0][1]
    assert plan.scaling[0][0] == 1 and one.memory.total < GPUS["h100"].memory_bytes  # each fits one H100
    if name == "large":  # 7B + optimizer offload: the host holds the Adam state
        assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_optimizer == "cpu"
        assert one.memory.host > 12 * llm
        assert memory_per_gpu(plan.work, stage_variant(cfg.deepspeed, 3).model_copy(
            update={"offload_optimizer": "none"}), 1).total > GPUS["h100"].memory_bytes


def test_lengths_that_do_not_fit_are_refused(tmp_path):
    cfg = load_config(recipe(tmp_path, TINY_MODEL))
    with pytest.raises(ConfigError, match="does not fit"):
        make_plan(cfg, sample_len=1000)


def test_anyres_prices_every_tile_of_the_largest_grid(tmp_path, tokenizer):
    from pretrain.config import build_config
    from pretrain.data.anyres import TokenCounter
    from pretrain.model.processing import build_processing

    none = load_config(recipe(tmp_path, TINY_MODEL))
    anyres = load_config(recipe(tmp_path, {**TINY_MODEL, "image_tiling": "anyres"}))
    flat, tiled = make_plan(none, text_tokens=32), make_plan(anyres, text_tokens=32)
    assert flat.work.images_per_sample == 1 and tiled.work.images_per_sample == 10  # 3x3 tiles + the base
    # A 96 x 96 image (the largest grid, no padding) costs what LlavaNextProcessor counts for it.
    processing = build_processing(build_config({**yaml.safe_load(recipe(tmp_path, {
        **TINY_MODEL, "image_tiling": "anyres", "tokenizer": "unused"}).read_text())}), tokenizer)
    from pretrain.data.anyres import llava_next_processor

    count = TokenCounter(llava_next_processor(processing.image_processor, tokenizer, processing.vlm_config))
    assert tiled.work.sample_len - flat.work.sample_len == count(96, 96) - 16
    assert tiled.work.image_positions == count(96, 96) and flat.work.image_positions == 16
    assert f"{count(96, 96)} image tokens" in render(tiled)  # the report says the decoder's image positions
    assert tiled.sample_flops.vision.total == pytest.approx(10 * flat.sample_flops.vision.total)


def test_a_clip_is_priced_at_data_video_frames_frames(tmp_path):
    anyres = {**TINY_MODEL, "image_tiling": "anyres"}
    still = make_plan(load_config(recipe(tmp_path, anyres)), text_tokens=32)
    cfg = load_config(recipe(tmp_path, anyres))
    cfg.data.video_frames = 8
    clip = make_plan(cfg, text_tokens=32)
    assert clip.work.images_per_sample == still.work.images_per_sample + 8  # 8 frames through the tower
    assert clip.work.image_positions == still.work.image_positions + 8 * 4  # 4 pooled tokens per 32-pixel frame
    assert clip.sample_flops.vision.total == pytest.approx(18 / 10 * still.sample_flops.vision.total)
