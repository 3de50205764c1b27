"""The model in one process (no DeepSpeed): projector kinds and their export, attention choice, packed rows under
every attention implementation that runs on CPU, activation checkpointing, projector files, tokenizer additions."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from helpers.model import check_grown_rows, write_bare_decoder
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlavaForConditionalGeneration

from pretrain.bench.device_check import per_token_loss
from pretrain.config import ConfigError, ModelConfig, build_config
from pretrain.data.batching import collate
from pretrain.data.sample import ProcessedSample
from pretrain.data.text import TextProcessor
from pretrain.model.attention import (
    AttentionChoice,
    attention_inputs,
    decode_rows,
    flash_attn_works,
    flex_row_widths,
    resolve_attention,
)
from pretrain.model.build import build_model, load_tokenizer
from pretrain.model.checkpointing import checkpointed_layers, enable_activation_checkpointing
from pretrain.model.projector import load_projector
from pretrain.model.stages import apply_stage
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES
from pretrain.model.vlm import VLMForTraining


def _mcfg(llm: str = "llama", vision: str = "clip", **kw) -> ModelConfig:
    return ModelConfig(llm=dict(DECODER_SHAPES[llm]), vision=dict(VISION_SHAPES[vision]), **kw)


def _samples(model, tokenizer, seed: int = 0) -> list[ProcessedSample]:
    """Two captioned images and a text-only conversation between them, of different lengths."""
    cfg = model.config
    text = TextProcessor(tokenizer, cfg.image_token_id, cfg.image_seq_length, max_length=256)
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size

    def image():
        return torch.randn(3, size, size, generator=g)

    a = text.caption("two red circles on the left of a blue square.")
    b = text.conversation([{"from": "human", "value": "say hello"}, {"from": "gpt", "value": "hello there"}], False)
    c = text.caption("a green triangle.")
    return [ProcessedSample(a.input_ids, a.labels, image()), ProcessedSample(b.input_ids, b.labels, None),
            ProcessedSample(c.input_ids, c.labels, image())]


def _per_sample_losses(wrapper: VLMForTraining, batch: dict, lengths: list[list[int]]) -> list[torch.Tensor]:
    """Token losses of each sample's own predictions (not the one across a boundary into the next sample)."""
    with torch.no_grad():
        losses = per_token_loss(wrapper, batch)
    out = []
    for r, row in enumerate(lengths):
        at = 0
        for k in row:
            out.append(losses[r, at : at + k - 1])
            at += k
    return out


# -- projector kinds ----------------------------------------------------------------------------------------------
def test_linear_projector_is_one_trained_layer_and_exports_as_plain_llava(tmp_path, tokenizer):
    model = build_model(_mcfg(projector="linear"), tokenizer)
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    assert torch.equal(proj.linear_2.weight, torch.eye(proj.linear_2.weight.shape[0]))
    assert not proj.linear_2.bias.any()
    trainable = apply_stage(model, "align")
    assert trainable == {"projector": proj.linear_1.weight.numel() + proj.linear_1.bias.numel()}
    assert not proj.linear_2.weight.requires_grad and proj.linear_1.weight.requires_grad
    model.save_pretrained(tmp_path)
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    x = torch.randn(2, 7, proj.linear_1.in_features)
    with torch.no_grad():
        assert torch.allclose(exported.model.multi_modal_projector(x), proj.linear_1(x), atol=1e-6)


def test_mlp2x_gelu_is_llavas_projector_and_deeper_mlps_are_refused(tokenizer):
    model = build_model(_mcfg(vision_feature_layer=[-1, -2]), tokenizer)
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "gelu"
    assert proj.linear_1.in_features == 2 * model.config.vision_config.hidden_size  # two layers concatenated
    tree = {"model": {"llm": "x", "vision": "y", "projector": "mlp3x_gelu"}, "data": {"train": [{"urls": "a"}]},
            "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="model.projector.*cannot be exported"):
        build_config(tree)


# -- attention ----------------------------------------------------------------------------------------------------
def test_attention_choice():
    assert resolve_attention("auto", half_precision=True, cuda=False) == AttentionChoice("sdpa", "sdpa")
    assert resolve_attention("eager", half_precision=False) == AttentionChoice("eager", "eager")
    # The tower has no mask: flex would only recompile per image count there.
    assert resolve_attention("flex_attention", half_precision=False) == AttentionChoice("flex_attention", "sdpa")
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_attention("flash_attention_2", half_precision=True, cuda=False)
    with pytest.raises(ConfigError, match="fp32"):
        resolve_attention("flash_attention_2", half_precision=False, cuda=True)


def test_flex_batches_take_a_few_widths(tmp_path):
    """flex_attention is compiled per shape: under it every batch is padded to one of a few widths, whatever its
    longest row; the other implementations pad to a multiple of 8 only."""
    from pretrain.train.engine import row_widths  # the trainer's side: tests may import it, the model may not

    assert flex_row_widths(2048) == (512, 1024, 1536, 2048)
    assert flex_row_widths(100) == (32, 56, 80, 104)
    widths = flex_row_widths(100)
    seen = set()
    for n in range(1, 101):
        batch = collate([[ProcessedSample([1] * n, [1] * n, None)]], pad_id=0, widths=widths)
        seen.add(batch["input_ids"].shape[1])
        assert batch["input_ids"].shape[1] >= n
    assert seen == set(widths)  # every width used, no other
    assert collate([[ProcessedSample([1] * 3, [1] * 3, None)]], pad_id=0)["input_ids"].shape[1] == 8
    tree = {"model": {"llm": {"model_type": "llama"}, "vision": {"model_type": "clip_vision_model"}},
            "data": {"train": [{"urls": "x.tar"}], "max_length": 100}, "train": {"max_steps": 1}}
    assert row_widths(build_config({**tree, "model": {**tree["model"], "attn_implementation": "flex_attention"}})) \
        == widths
    assert row_widths(build_config({**tree, "model": {**tree["model"], "attn_implementation": "sdpa"}})) is None


def test_alignment_rows_take_the_loader_widths(tokenizer):
    """The alignment objectives' own decoder rows (texts; image + text) are padded to the loader's widths too, so
    flex_attention compiles no kernel per text length."""
    model = VLMForTraining(build_model(_mcfg(), tokenizer))
    ids, mask = model.pad_rows([[5] * 3, [5] * 40])
    assert ids.shape == (2, 40)
    model.row_widths = flex_row_widths(100)
    ids, mask = model.pad_rows([[5] * 3, [5] * 40])
    assert ids.shape == (2, 56) and mask.sum(1).tolist() == [3, 40]
    assert model.pad_rows([[5] * 130])[0].shape == (1, 130)  # longer than every width: its own


FLASH_STAND_INS = {
    # A wheel built for another torch: the package is found, its compiled extension fails to load.
    "broken_import": 'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n',
    # Loads, but was built for other GPU architectures.
    "broken_kernel": "def flash_attn_func(q, k, v, causal=False):\n"
                     "    raise RuntimeError('CUDA error: no kernel image is available for execution on the device')\n",
    "working": "__version__ = '2.8.3'\ndef flash_attn_func(q, k, v, causal=False):\n    return q.clone()\n",
}


@pytest.mark.parametrize("kind", sorted(FLASH_STAND_INS))
def test_auto_takes_flash_attention_only_when_its_kernel_runs(tmp_path, monkeypatch, caplog, kind):
    """A flash_attn package on sys.path that fails at import or at its first call falls back, with the reason
    logged; an explicit flash_attention_2 is refused with the same reason. The tiny call runs on the CPU here."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(FLASH_STAND_INS[kind])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    flash_attn_works.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="pretrain.model.attention"):
            got = resolve_attention("auto", half_precision=True, cuda=True, probe_device="cpu", packing=True)
            padded = resolve_attention("auto", half_precision=True, cuda=True, probe_device="cpu")
        if kind == "working":
            assert padded == got
            assert got == AttentionChoice("flash_attention_2", "flash_attention_2")
            assert "flash-attn 2.8.3 runs" in caplog.text
            return
        # Without a working flash-attn, CUDA takes flex_attention for packed rows (block masks, no dense mask) and
        # sdpa for padded ones (a padding mask keeps its efficient kernel).
        assert got == AttentionChoice("flex_attention", "sdpa") and padded == AttentionChoice("sdpa", "sdpa")
        reason = "does not import" if kind == "broken_import" else "its kernel fails"
        assert reason in caplog.text and "auto -> flex_attention" in caplog.text
        with pytest.raises(ConfigError, match=reason):
            resolve_attention("flash_attention_2", half_precision=True, cuda=True, probe_device="cpu")
    finally:
        flash_attn_works.cache_clear()
        sys.modules.pop("flash_attn", None)


def _packing_batches(samples: list[ProcessedSample], pad_id: int) -> tuple[dict, list[dict]]:
    """Two packed rows ([s0 s1], [s2 + pad]) and the same samples unpacked, every batch of shape (2, W): the pad
    tails are segments of their own, so all take the same mask path and flex_attention compiles one kernel, not two
    (~20 s)."""
    width = len(samples[0]) + len(samples[1])
    packed = collate([samples[:2], samples[2:]], pad_id, pad_to_multiple=width)
    alone = [collate([[samples[0]], [samples[1]]], pad_id, pad_to_multiple=width),
             collate([[samples[2]], [samples[0]]], pad_id, pad_to_multiple=width)]
    assert packed["packed"] and {b["input_ids"].shape for b in [packed, *alone]} == {(2, width)}
    return packed, alone


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
def test_packed_rows_give_each_sample_its_unpacked_loss(tokenizer, impl):
    """Packed rows (masks from the host-known sample_lengths) must score every sample as if it were alone."""
    model = build_model(_mcfg(attn_implementation=impl), tokenizer).eval()
    assert model.config.text_config._attn_implementation == impl
    wrapper = VLMForTraining(model)
    samples = _samples(model, tokenizer)
    packed, alone = _packing_batches(samples, tokenizer.pad_token_id)
    got = _per_sample_losses(wrapper, packed, packed["sample_lengths"])
    want = _per_sample_losses(wrapper, alone[0], alone[0]["sample_lengths"])
    want.append(_per_sample_losses(wrapper, alone[1], alone[1]["sample_lengths"])[0])
    for g, w in zip(got, want):
        assert w.sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # The check can fail: boundaries that merge a row's samples make the later sample attend to the earlier one.
    leaky = {**packed, "sample_lengths": [[sum(row)] for row in packed["sample_lengths"]]}
    crossed = _per_sample_losses(wrapper, leaky, packed["sample_lengths"])
    assert not torch.allclose(crossed[1], got[1], atol=1e-3)


def test_flash_varlen_kwargs_cut_the_rows_laid_end_to_end_at_every_sample(tokenizer):
    """flash_attention_2 cannot run here: check the varlen kwargs themselves. transformers flattens (B, L) to B*L
    and runs causal attention within [cu[i], cu[i+1]): every such span must be exactly one sample or a pad tail."""
    model = build_model(_mcfg(), tokenizer)
    samples = _samples(model, tokenizer)
    packed, _ = _packing_batches(samples, tokenizer.pad_token_id)
    embeds = torch.zeros(*packed["input_ids"].shape, 8)
    got = attention_inputs("flash_attention_2", packed["sample_lengths"], embeds, packed["position_ids"])
    assert got["attention_mask"] is None and got["position_ids"] is packed["position_ids"]
    cu = got["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and got["cu_seq_lens_k"] is cu
    flat = packed["input_ids"].reshape(-1)
    spans = [flat[a:b].tolist() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    pad = len(samples[0]) + len(samples[1]) - len(samples[2])
    assert spans == [samples[0].input_ids, samples[1].input_ids, samples[2].input_ids, [tokenizer.pad_token_id] * pad]
    assert got["max_length_q"] == got["max_length_k"] == max(len(s) for s in samples)
    assert isinstance(got["max_length_q"], int)  # a Python int: no .item() in every layer


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave", "item", "is_nonzero"}


class _SyncCount(TorchDispatchMode):
    """Ops that read a device value back to the host (or have data-dependent output shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_decoder_masks_from_sample_lengths_read_nothing_back(tokenizer, impl):
    """With host-known boundaries a packed decoder forward reads nothing back, one full sample per row gets no
    all-ones mask; the same packed batch through transformers' position-id path has syncs."""
    model = build_model(_mcfg(attn_implementation=impl), tokenizer).eval()
    wrapper = VLMForTraining(model)
    samples = _samples(model, tokenizer)
    packed, _ = _packing_batches(samples, tokenizer.pad_token_id)
    full = collate([[samples[0]], [samples[0]]], tokenizer.pad_token_id, pad_to_multiple=1)
    decoder = model.model.language_model
    assert attention_inputs(impl, full["sample_lengths"], torch.zeros(2, len(samples[0]), 8), None) == \
        {"attention_mask": None, "position_ids": None}
    counts = {}
    with torch.no_grad():
        cases = (("packed", packed, packed["sample_lengths"]), ("full", full, full["sample_lengths"]),
                 ("positions", packed, None))
        for name, batch, lengths in cases:
            embeds = wrapper.embed(batch["input_ids"], None)
            with _SyncCount() as mode:
                if lengths is None:  # transformers' own path: no mask, boundaries from restarting position ids
                    decoder(inputs_embeds=embeds, position_ids=batch["position_ids"], use_cache=False)
                else:
                    decode_rows(decoder, embeds, batch["position_ids"], lengths)
            counts[name] = mode.seen
    assert counts["packed"] == []
    # Without a mask the decoder makes its own position ids and transformers checks them for restarts: one read per
    # forward (not per layer), the price of keeping sdpa's is_causal kernels for rows without padding.
    assert counts["full"] == ["_local_scalar_dense"]
    assert counts["positions"], "transformers' own packed-row detection reads the position ids back"


def test_flash_attention_path_reads_back_once_per_forward_in_transformers_mask_code(tokenizer):
    """What flash_attention_2 costs in host syncs, counted on the CPU (its kernel cannot run here): our kwargs carry
    no mask and the position ids, so transformers' create_causal_mask checks those for packed sequences, one read
    back per decoder forward (the docstring of pretrain.model.attention says so); the layers add none (the varlen
    lengths are Python ints, test above)."""
    from transformers.masking_utils import create_causal_mask

    model = build_model(_mcfg(), tokenizer).eval()
    config = model.model.language_model.config
    packed, _ = _packing_batches(_samples(model, tokenizer), tokenizer.pad_token_id)
    embeds = torch.zeros(*packed["input_ids"].shape, config.hidden_size)
    inputs = attention_inputs("flash_attention_2", packed["sample_lengths"], embeds, packed["position_ids"])
    config._attn_implementation = "flash_attention_2"
    try:
        with _SyncCount() as mode:
            mask = create_causal_mask(config, embeds, inputs["attention_mask"], None, inputs["position_ids"])
    finally:
        config._attn_implementation = "sdpa"
    assert mask is None and mode.seen == ["_local_scalar_dense"]


# -- activation checkpointing -------------------------------------------------------------------------------------
def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss, n = VLMForTraining(model)(batch)
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _attention_calls(model) -> dict[str, list[int]]:
    """Count each layer's attention calls: a checkpointed layer runs twice per step (forward and recompute)."""
    calls: dict[str, list[int]] = {}
    stacks = {"llm": model.model.language_model.layers, "vision": model.model.vision_tower.encoder.layers}
    for name, layers in stacks.items():
        calls[name] = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.self_attn.register_forward_hook(lambda *_, n=name, i=i: calls[n].__setitem__(i, calls[n][i] + 1))
    return calls


@pytest.mark.parametrize(("mode", "checkpointed"), [("full", [0, 1, 2, 3]), ("every_k", [0, 2])])
def test_activation_checkpointing_keeps_loss_and_gradients(tokenizer, mode, checkpointed):
    shape = {"num_hidden_layers": 4}
    mcfg = ModelConfig(llm={**DECODER_SHAPES["llama"], **shape}, vision={**VISION_SHAPES["clip"], **shape},
                       vision_feature_layer=-1)
    plain = build_model(mcfg, tokenizer).train()
    apply_stage(plain, "full")
    batch = collate([[s] for s in _samples(plain, tokenizer)], tokenizer.pad_token_id)
    want_loss, want_grads = _loss_and_grads(plain, batch)
    model = build_model(mcfg, tokenizer).train()
    apply_stage(model, "full")
    enable_activation_checkpointing(model, mode, every_k=2)
    assert checkpointed_layers(model) == {"llm": checkpointed, "vision": checkpointed}
    calls = _attention_calls(model)
    loss, grads = _loss_and_grads(model, batch)
    for stack in ("llm", "vision"):
        assert calls[stack] == [2 if i in checkpointed else 1 for i in range(4)], stack
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    assert any("vision_tower" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], want_grads[k], rtol=1e-5, atol=1e-7, msg=k)


def test_the_training_wrapper_trains_components_loaded_from_directories(tokenizer, assets):
    """from_pretrained (a hub id or a directory) leaves a model in eval mode, where transformers silently skips
    activation checkpointing: the training wrapper puts every module in train mode, so checkpointed layers recompute."""
    model = build_model(ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"])), tokenizer)
    apply_stage(model, "full")
    enable_activation_checkpointing(model, "full")
    wrapper = VLMForTraining(model)
    assert all(m.training for m in wrapper.modules())
    calls = _attention_calls(model)
    loss, n = wrapper(collate([[s] for s in _samples(model, tokenizer)], tokenizer.pad_token_id))
    (loss / n).backward()
    assert calls["llm"] == [2, 2] and calls["vision"][0] == 2  # forward + recompute


# -- projector files ----------------------------------------------------------------------------------------------
def test_projector_from_reads_llava_and_hf_layouts(tmp_path, tokenizer):
    model = build_model(_mcfg(), tokenizer)
    proj = model.model.multi_modal_projector
    src = {k: torch.randn_like(v) for k, v in proj.state_dict().items()}
    # The LLaVA repo's stage-1 output: nn.Sequential indices under `model.mm_projector`.
    llava = {f"model.mm_projector.{'0' if k.startswith('linear_1') else '2'}.{k.split('.')[-1]}": v
             for k, v in src.items()}
    torch.save(llava, tmp_path / "mm_projector.bin")
    assert load_projector(proj, tmp_path / "mm_projector.bin", linear=False) == sorted(src)
    for k, v in proj.state_dict().items():
        assert torch.equal(v, src[k]), k
    # A sharded export directory: only the shard(s) holding the projector are read.
    exported = tmp_path / "export"
    model.save_pretrained(exported, max_shard_size="100KB")
    assert json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    fresh = build_model(_mcfg(), tokenizer, seed=1).model.multi_modal_projector
    load_projector(fresh, exported, linear=False)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src[k]), k


def test_projector_from_refuses_what_does_not_fit(tmp_path, tokenizer):
    proj = build_model(_mcfg(), tokenizer).model.multi_modal_projector
    w = proj.linear_1.weight
    save_file({"model.mm_projector.weight": torch.randn_like(w), "model.mm_projector.bias": torch.zeros(w.shape[0])},
              tmp_path / "linear.safetensors")
    with pytest.raises(ConfigError, match="set model.projector=linear"):
        load_projector(proj, tmp_path / "linear.safetensors", linear=False)
    deep = {f"mm_projector.{i}.weight": torch.zeros(64, 64) for i in (0, 2, 4)}
    save_file(deep, tmp_path / "deep.safetensors")
    with pytest.raises(ConfigError, match="deeper than two"):
        load_projector(proj, tmp_path / "deep.safetensors", linear=False)
    save_file({f"multi_modal_projector.{k}": torch.zeros(3, *v.shape[1:]) for k, v in proj.state_dict().items()},
              tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="is \\(3"):
        load_projector(proj, tmp_path / "other.safetensors", linear=False)
    # A single-layer file fits a linear projector: linear_2 stays the identity.
    linear = build_model(_mcfg(projector="linear"), tokenizer).model.multi_modal_projector
    assert load_projector(linear, tmp_path / "linear.safetensors", linear=True) == ["linear_1.bias", "linear_1.weight"]
    assert torch.equal(linear.linear_2.weight, torch.eye(w.shape[0]))


def test_init_from_must_agree_with_explicit_keys(tmp_path, tokenizer):
    model = build_model(_mcfg(), tokenizer)
    model.save_pretrained(tmp_path)
    again = build_model(_mcfg(init_from=str(tmp_path)), tokenizer)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(ConfigError, match="model.projector='linear' but model.init_from"):
        build_model(_mcfg(init_from=str(tmp_path), projector="linear"), tokenizer)


# -- tokenizer ----------------------------------------------------------------------------------------------------
def test_image_and_pad_tokens_are_added_and_embeddings_grow_from_the_mean(tmp_path):
    llm, bare_len = write_bare_decoder(tmp_path / "llm")
    tok = load_tokenizer(_mcfg(tokenizer=str(llm)))
    assert len(tok) == bare_len + 2 and tok.pad_token == "<pad>"
    assert tok("a <image> b")["input_ids"].count(tok.convert_tokens_to_ids("<image>")) == 1
    model = build_model(ModelConfig(llm=str(llm), vision=dict(VISION_SHAPES["clip"])), tok)
    rows = model.get_input_embeddings().num_embeddings
    assert rows >= len(tok) and rows % 64 == 0
    assert model.lm_head.weight.shape[0] == rows
    check_grown_rows(model.get_input_embeddings().weight.detach(), bare_len)
    check_grown_rows(model.lm_head.weight.detach(), bare_len)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") >= bare_len
    assert model.config.pad_token_id == tok.pad_token_id >= bare_len


def test_model_is_built_on_the_host_in_the_training_precision(tokenizer):
    from pretrain.train.engine import host_dtype

    # A decoder vocabulary smaller than the tokenizer's: the build grows the embeddings.
    llm = {**DECODER_SHAPES["llama"], "vocab_size": 64}
    base = {"model": {"llm": llm, "vision": dict(VISION_SHAPES["clip"]), "tokenizer": "unused"},
            "data": {"train": [{"urls": "x.tar"}]}}
    sizes = {}
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = build_config({**base, "train": {"precision": precision, "max_steps": 1, "micro_batch_size": 1}})
        assert host_dtype(cfg) == want
        model = build_model(cfg.model, tokenizer, dtype=host_dtype(cfg))
        assert model.get_input_embeddings().num_embeddings >= len(tokenizer) > 64
        # Every parameter, the grown embedding rows and the projector included, is in that dtype.
        assert {p.dtype for p in model.parameters()} == {want}
        sizes[precision] = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sizes["bf16"] * 2 == sizes["fp32"]
