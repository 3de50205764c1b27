"""Projector-only (align stage) checkpoints: frozen weights from the checkpoint or from their sources (also when the
checkpoint lacks them), and the way back: a stage-2 run with model.init_from=<export> starts from exactly the
exported weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers.export import load_export, run_config, sample_processor, train_run
from helpers.runs import losses
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from pretrain.export.hf import convert, resolve_checkpoint
from pretrain.model.build import build_model, load_tokenizer
from pretrain.model.vlm import VLMForTraining
from pretrain.train import checkpoint as ckpt
from pretrain.train.engine import make_loader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def align_run(tmp_path_factory, assets, shapes):
    # ZeRO-1: DeepSpeed keeps frozen weights only in the module state dict (its own zero_to_fp32 drops them).
    return train_run(tmp_path_factory.mktemp("export_align"), assets, shapes,
                     **{"deepspeed.zero_stage": 1, "train.stage": "align"})


@pytest.fixture(scope="module")
def align_export(align_run, tmp_path_factory):
    return convert(align_run, tmp_path_factory.mktemp("hf_align") / "model")


def tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_align_export_is_the_trained_projector_on_the_frozen_sources(align_run, align_export, assets):
    model = load_export(align_export)
    decoder = AutoModelForCausalLM.from_pretrained(assets["llama"])
    tower = AutoModel.from_pretrained(assets["clip"])
    for part, source in ((model.model.language_model, decoder.model), (model.model.vision_tower, tower),
                         (model.lm_head, decoder.lm_head)):
        for (name, a), (_, b) in zip(part.state_dict().items(), source.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    tag = resolve_checkpoint(align_run)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)  # the projector only
    assert trained and all("multi_modal_projector" in k for k in trained)
    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k.removeprefix("vlm.")], v), k


def test_frozen_weights_from_sources_equal_the_checkpoints_copy(align_run, align_export, tmp_path):
    # fp32 run: the checkpoint's copy of the frozen weights is exact, so both origins give identical files.
    from_source = convert(align_run, tmp_path / "src", frozen_from="source")
    a, b = tensors(align_export), tensors(from_source)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _drop_frozen(run_dir) -> None:
    """Rewrite the checkpoint as DeepSpeed's save_checkpoint(exclude_frozen_parameters=True) writes it: the module
    state dict without frozen parameters (and no frozen shapes or fragments), then commit it again."""
    tag = resolve_checkpoint(run_dir)
    path = tag / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    trainable = {n for group in state["param_shapes"] for n in group}
    state["module"] = {k: v for k, v in state["module"].items() if k in trainable}
    state["frozen_param_shapes"] = state["frozen_param_fragments"] = None
    torch.save(state, path)
    ckpt.commit(tag.parent, tag.name, ckpt.read_meta(tag))


def test_checkpoint_without_frozen_weights_takes_them_from_sources(align_run, align_export, tmp_path, caplog):
    copy = tmp_path / "run"
    shutil.copytree(align_run, copy)
    _drop_frozen(copy)
    with caplog.at_level("INFO"):
        out = convert(copy, tmp_path / "hf")
    assert "frozen tensors taken from the run's sources" in caplog.text
    a, b = tensors(align_export), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # No run config any more (the run directory's nor the checkpoint's copy), so no sources: a clear error and no
    # partial export.
    tag = resolve_checkpoint(copy)
    for path in (copy / "config.yaml", tag / "config.yaml"):
        path.unlink(missing_ok=True)
    ckpt.commit(tag.parent, tag.name, ckpt.read_meta(tag))
    with pytest.raises(FileNotFoundError, match="neither in the checkpoint nor in the run's sources"):
        convert(copy, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def test_a_stage2_run_from_the_export_starts_from_its_weights(align_export, tmp_path, assets, shapes):
    run = train_run(tmp_path / "finetune", assets, shapes, nproc=1,
                    **{"model.init_from": str(align_export), "train.stage": "finetune", "train.max_steps": 1})
    cfg = run_config(run)
    tokenizer = load_tokenizer(cfg.model)  # the export's tokenizer, through init_from
    model = build_model(cfg.model, tokenizer, seed=cfg.run.seed).eval()
    exported = load_export(align_export).state_dict()
    assert model.state_dict().keys() == exported.keys()
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    # The run's first batch, rebuilt with the run's own loader: the export's loss on it is the run's step-1 loss.
    processor = sample_processor(cfg, tokenizer, model.config)
    batch = next(iter(make_loader(cfg, cfg.data.train, processor, tokenizer.pad_token_id, 0, 1, train=True)))
    with torch.no_grad():
        loss_sum, count = VLMForTraining(model)(batch)
    expected = loss_sum.double().item() / count.item()
    assert losses(run)[1] == pytest.approx(expected, rel=1e-6, abs=0)
