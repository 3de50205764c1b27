"""`pretrain convert` on real 2-rank ZeRO-2 and ZeRO-3 checkpoints: the export loads with plain transformers (no
missing or unexpected keys) and its logits equal the training model's; the processor expands <image> as our data
path does; sharding, bf16, and `pretrain generate` on the export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers.export import (
    data_batch,
    hf_inputs,
    load_export,
    run_config,
    training_logits,
    training_model,
    val_samples,
)
from helpers.runs import ROOT
from safetensors import safe_open

from pretrain.export.hf import convert, resolve_checkpoint

pytestmark = pytest.mark.slow

# ZeRO-2: Llama + CLIP, everything trained (the shared ZeRO-2 reference run of the trainer tests). ZeRO-3: Qwen2
# (tied embeddings) + SigLIP, the tower frozen (stage finetune: the shared run of the model tests), so frozen
# parameters come from DeepSpeed's per-rank fragments.
STAGES = (2, 3)


@pytest.fixture(scope="module", params=STAGES)
def run(request, reference_run):
    return reference_run(2) if request.param == 2 else request.getfixturevalue("finetune_run")


@pytest.fixture(scope="module")
def z2_export(tmp_path_factory, reference_run):
    run = reference_run(2)
    return run, convert(run, tmp_path_factory.mktemp("hf") / "model", "fp32")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    # A small shard size, so the export is sharded with an index even for the tiny model.
    return convert(run, tmp_path_factory.mktemp("hf") / "model", "fp32", max_shard_size="150KB")


def reference_state(run) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation (independent of our reader) of the run's last checkpoint."""
    tag = resolve_checkpoint(run)
    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def test_export_logits_equal_the_training_model(run, exported):
    wrapper, tokenizer = training_model(run, reference_state(run))
    parts = val_samples(2)
    batch = data_batch(run, tokenizer, wrapper.vlm.config, parts)
    ours = training_logits(wrapper, batch)
    model = load_export(exported)
    inputs = hf_inputs(exported, parts)
    with torch.no_grad():
        theirs = model(**inputs).logits.float()
    for row in range(len(parts)):
        n = int(batch["attention_mask"][row].sum())
        # The processor expands <image> to the same tokens (and count) as our data path, with the same pixels.
        assert inputs["input_ids"][row, :n].tolist() == batch["input_ids"][row, :n].tolist()
        assert int(inputs["attention_mask"][row].sum()) == n
        assert (inputs["input_ids"][row] == model.config.image_token_id).sum() == model.config.image_seq_length
        diff = (ours[row, :n] - theirs[row, :n]).abs().max().item()
        assert diff <= 1e-5, f"row {row}: max |logit diff| {diff}"
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"], atol=1e-6, rtol=0)


def test_export_is_sharded_safetensors_with_index_and_processor(run, exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "processor_config.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".py"))]
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s in names for s in shards)
    total = 0
    for shard in shards:
        with safe_open(exported / shard, "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            size = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert size <= 150_000 or len(f.keys()) == 1  # only a tensor larger than the limit gets its own shard
        total += size
    assert total == index["metadata"]["total_size"]
    config = json.loads((exported / "config.json").read_text())
    tied = config["text_config"].get("tie_word_embeddings", False)
    assert ("language_model.lm_head.weight" in index["weight_map"]) != tied


def test_bf16_export_is_the_rounded_fp32_export(z2_export, tmp_path):
    run, exported = z2_export
    bf16 = convert(run, tmp_path / "bf16", "bf16")
    assert (bf16 / "model.safetensors").is_file() and not (bf16 / "model.safetensors.index.json").exists()
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    full = load_export(exported)
    half = load_export(bf16, dtype="auto")
    for (name, a), (_, b) in zip(full.state_dict().items(), half.state_dict().items(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_generate_cli_on_an_export(z2_export, tmp_path):
    import io

    from PIL import Image
    from transformers import AutoProcessor

    _, exported = z2_export
    paths = []
    for i, parts in enumerate(val_samples(2)):
        paths.append(tmp_path / f"img{i}.png")
        Image.open(io.BytesIO(parts["png"])).save(paths[-1])
    cmd = [sys.executable, "-m", "pretrain", "generate", str(exported), "--image", str(paths[0]), "--image",
           str(paths[1]), "--prompt", "What shape is it?", "--max-new-tokens", "6"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split("\t") for line in out.stdout.splitlines() if "\t" in line]
    assert [p for p, _ in lines] == [str(p) for p in paths]
    # The same greedy answers as plain transformers with the exported processor and chat template.
    processor, model = AutoProcessor.from_pretrained(exported), load_export(exported)
    tok = processor.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat shape is it?"}], tokenize=False,
                                     add_generation_prompt=True)
    for (_, text), path in zip(lines, paths, strict=True):
        inputs = processor(images=Image.open(path).convert("RGB"), text=prompt, return_tensors="pt",
                           add_special_tokens=False)
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_generate_together_answers_about_several_images_through_the_typed_chat_template(z2_export, tmp_path,
                                                                                        capsys):
    import io

    from PIL import Image
    from transformers import AutoProcessor

    from pretrain.cli import main
    from pretrain.export.inference import Captioner, load_image

    _, exported = z2_export
    paths = []
    for i, parts in enumerate(val_samples(2)):
        paths.append(tmp_path / f"img{i}.png")
        Image.open(io.BytesIO(parts["png"])).save(paths[-1])
    images = ["--image", str(paths[0]), "--image", str(paths[1])]
    args = ["generate", str(exported), *images, "--together", "--max-new-tokens", "6", "--device", "auto"]
    assert main([*args, "--prompt", "Is <image> like <image>?"]) == 0
    path, text = capsys.readouterr().out.strip().splitlines()[-1].split("\t")
    assert path == f"{paths[0]},{paths[1]}"
    # What a transformers user runs: typed messages with both pictures, tokenized by the export's processor.
    processor, model = AutoProcessor.from_pretrained(exported), load_export(exported)
    content = [{"type": "text", "text": "Is "}, {"type": "image", "path": str(paths[0])},
               {"type": "text", "text": "like "}, {"type": "image", "path": str(paths[1])},
               {"type": "text", "text": "?"}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 2 * model.config.image_seq_length and inputs["pixel_values"].shape[0] == 2
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert text == processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # The tiny model's answer hardly depends on its input: check what generate was given, too.
    captioner, given = Captioner(exported), {}
    original = captioner.model.generate
    captioner.model.generate = lambda **kw: given.update(kw) or original(**kw)
    captioner.together([load_image(p) for p in paths], "Is <image> like <image>?", max_new_tokens=2)
    assert torch.equal(given["input_ids"], inputs["input_ids"])
    assert torch.equal(given["pixel_values"], inputs["pixel_values"])
    # Markers that do not match the images: one clear line, before any model is loaded.
    assert main([*args, "--prompt", "Only <image>?"]) == 2
    assert "1 <image> markers for 2 image(s)" in capsys.readouterr().out


def test_eval_reads_the_checkpoint_without_an_export_and_scores_what_the_export_scores(run, tmp_path,
                                                                                       monkeypatch):
    import tempfile

    from transformers import LlavaForConditionalGeneration

    from pretrain.eval import loading
    from pretrain.eval.run import EvalOptions, evaluate

    cfg, tag = run_config(run), resolve_checkpoint(run)
    opts = EvalOptions(samples=6, retrieval_samples=6, batch_size=4, max_new_tokens=4, device="cpu")
    exported = convert(run, tmp_path / "hf", "fp32")  # what eval loaded before: a full fp32 export, read back

    def from_export(*_):
        return LlavaForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()

    def refuse(*_, **__):
        raise AssertionError("eval wrote an export")

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr("pretrain.export.hf.write_weights", refuse)
    monkeypatch.setattr("pretrain.export.hf.convert", refuse)
    direct = loading.load_llava(tag, torch.device("cpu"), torch.float32)
    for (name, a), (_, b) in zip(from_export().state_dict().items(), direct.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    now = evaluate(cfg, run, opts)
    assert not any(scratch.iterdir())
    monkeypatch.setattr(loading, "load_llava", from_export)
    before = evaluate(cfg, run, opts)
    now.pop("seconds"), before.pop("seconds")
    assert now == before
    assert now["val"]["loss"] > 0 and now["captioning"]["n"] == 6 and now["retrieval"] is not None


def _odd_mode_images(tmp_path) -> dict[str, object]:
    """A picture with 37% transparent pixels as RGBA, LA and palette PNGs, and a CMYK JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((40, 48)) < 0.37, 0, 255)
    base = Image.fromarray(rgba, "RGBA")
    images = {"RGBA": base, "LA": base.convert("LA"), "P": base.convert("P"), "CMYK": base.convert("CMYK")}
    images["P"].info["transparency"] = 0
    paths = {}
    for mode, img in images.items():
        paths[mode] = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(paths[mode])
    return paths


def test_generate_sees_the_pixels_training_saw_and_names_a_run_directory(z2_export, tmp_path, capsys):
    from PIL import Image

    from pretrain.cli import main
    from pretrain.data.image import ImageTransform
    from pretrain.export.inference import Captioner, load_image
    from pretrain.model.processing import image_processor_for

    run, exported = z2_export
    training = ImageTransform.from_processor(image_processor_for(run_config(run).model))
    captioner = Captioner(exported)
    for mode, path in _odd_mode_images(tmp_path).items():
        assert Image.open(path).mode == mode
        seen = training.decode(path.read_bytes())  # the trainer's decode + preprocess of the same bytes
        shown = captioner.inputs(Image.open(path), "What is it?")["pixel_values"][0]  # a picture in its own mode
        assert torch.equal(shown, seen), mode
        assert torch.equal(captioner.inputs(load_image(path))["pixel_values"][0], seen), mode  # the CLI's path
        if mode == "RGBA":  # the old path (convert("RGB") drops alpha) is visibly different
            plain = captioner.processor(images=Image.open(path).convert("RGB"), text="<image>",
                                        return_tensors="pt")["pixel_values"][0]
            assert (plain - seen).abs().max() > 0.5
    image = str(tmp_path / "RGBA.png")
    for target, what in ((run, "a training run directory"), (run / "checkpoints" / "latest", "")):
        target = target if what else target.parent / target.read_text().strip()
        assert main(["generate", str(target), "--image", image]) == 2
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and f"pretrain convert {target} OUT_DIR" in out[0], out
        assert (what or "a checkpoint") in out[0]


def test_reader_with_tiny_budgets_equals_deepspeeds_consolidation(run):
    """Pieces of a few hundred bytes and files unmapped every 4 KiB read: same tensors as DeepSpeed's zero_to_fp32."""
    from pretrain.export.zero import ZeroCheckpoint

    zero = ZeroCheckpoint(resolve_checkpoint(run), release_bytes=4096, chunk_bytes=256)
    releases = 0
    original = zero.release

    def counting_release():
        nonlocal releases
        releases += 1
        original()

    zero.release = counting_release
    reference = reference_state(run)
    assert {zero.resolve(k) for k in reference} <= set(zero.locs)
    for name, want in reference.items():
        pieces = list(zero.pieces(zero.resolve(name)))
        assert all(p.numel() * p.element_size() <= 256 for p in pieces)
        assert torch.equal(torch.cat(pieces).view(want.shape), want), name
    assert releases > 10
