"""The FLOPs model against hand counts, and its parameter counts against real transformers modules (meta device)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from pretrain.model.flops import (
    PEAK_FLOPS,
    DecoderShape,
    VisionShape,
    VLMShape,
    count_params,
    flops_per_sample,
    mfu,
    peak_flops,
    step_flops,
)

# A 2-layer Llama with GQA (4 query heads, 2 key/value heads of 16) + a 3-layer CLIP tower + mlp2x_gelu projector.
LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
LENS = [40, 24]  # two samples packed into one row; 16 image tokens each
LOGITS = 10


def tiny_shape() -> VLMShape:
    return VLMShape.from_configs(AutoConfig.for_model("llama", **LLAMA),
                                 AutoConfig.for_model("clip_vision_model", **CLIP), "mlp2x_gelu")


def hand_forward() -> dict[str, float]:
    """Forward FLOPs written out matmul by matmul (2 x rows x in x out), independently of the code under test."""
    tokens = sum(LENS)
    per_token_layer = (2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 32 + 2 * 64 * 64  # q, k, v (GQA: 2 x 16), o
                       + 2 * 64 * 160 + 2 * 64 * 160 + 2 * 160 * 64)  # gate, up, down
    decoder = tokens * 2 * per_token_layer
    # Per sample and layer: Q K^T and P V, each 2 x L x L x (4 heads x 16).
    attention = 2 * sum(2 * L * L * 64 + 2 * L * L * 64 for L in LENS)
    lm_head = 2 * LOGITS * 64 * 100
    seq = 16 + 1  # 4x4 patches + CLIP's class token
    patch = 2 * 16 * (3 * 8 * 8) * 32
    v_layer = 4 * (2 * seq * 32 * 32) + 2 * seq * 32 * 64 + 2 * seq * 64 * 32
    v_att_layer = 2 * seq * seq * 32 + 2 * seq * seq * 32
    projector = 2 * 16 * 32 * 64 + 2 * 16 * 64 * 64  # CLS dropped: 16 features per image
    return {"decoder": decoder, "attention": attention, "lm_head": lm_head, "patch": 2 * patch,
            "v_layer": 2 * v_layer, "v_att_layer": 2 * v_att_layer, "proj1": 2 * 2 * 16 * 32 * 64,
            "proj2": 2 * 2 * 16 * 64 * 64, "projector": 2 * projector}


def test_forward_matches_hand_count():
    h = hand_forward()
    f = step_flops(tiny_shape(), LENS, images=2, logit_tokens=LOGITS, stage="full")
    assert f.decoder.forward == h["decoder"]
    assert f.attention.forward == h["attention"]
    assert f.lm_head.forward == h["lm_head"]
    assert f.vision.forward == h["patch"] + 3 * h["v_layer"]  # all 3 layers run
    assert f.vision_attention.forward == 3 * h["v_att_layer"]
    assert f.projector.forward == h["projector"]
    assert (f.tokens, f.images, f.logit_tokens) == (64, 2, LOGITS)


def test_backward_by_stage_matches_hand_count():
    h = hand_forward()
    shape = tiny_shape()
    full = step_flops(shape, LENS, images=2, logit_tokens=LOGITS, stage="full")
    # full: 2x everywhere, but feature layer -2 means CLIP's last layer gets no gradient; the patch conv needs no
    # input gradient (its input is pixels).
    assert full.decoder.backward == 2 * h["decoder"]
    assert full.attention.backward == 2 * h["attention"]
    assert full.lm_head.backward == 2 * h["lm_head"]
    assert full.vision.backward == h["patch"] + 2 * 2 * h["v_layer"]
    assert full.vision_attention.backward == 2 * 2 * h["v_att_layer"]
    assert full.projector.backward == 2 * h["projector"]

    align = step_flops(shape, LENS, images=2, logit_tokens=LOGITS, stage="align")
    # align: frozen decoder passes activation gradients only (1x) to reach the projector; tower forward only;
    # the projector's first layer needs its weight gradient but no input gradient.
    assert align.decoder.backward == h["decoder"]
    assert align.attention.backward == 2 * h["attention"]
    assert align.lm_head.backward == h["lm_head"]
    assert align.vision.backward == 0 and align.vision_attention.backward == 0
    assert align.projector.backward == h["proj1"] + 2 * h["proj2"]

    fine = step_flops(shape, LENS, images=2, logit_tokens=LOGITS, stage="finetune")
    assert fine.decoder.backward == 2 * h["decoder"]
    assert fine.lm_head.backward == 2 * h["lm_head"]
    assert fine.vision.backward == 0
    assert fine.projector.backward == h["proj1"] + 2 * h["proj2"]
    assert align.forward == fine.forward == full.forward
    assert align.total < fine.total < full.total


def test_packed_rows_attend_per_sample():
    shape = tiny_shape()
    packed = step_flops(shape, [40, 24], images=2)
    one_long = step_flops(shape, [64], images=2)
    assert packed.decoder == one_long.decoder  # weight matmuls only see the token count
    assert packed.attention.forward == 4 * 2 * 64 * (40**2 + 24**2)
    assert one_long.attention.forward - packed.attention.forward == 4 * 2 * 64 * (2 * 40 * 24)
    parts = [step_flops(shape, [n], images=1) for n in (40, 24)]
    assert packed.total == pytest.approx(sum(p.total for p in parts))


def test_causal_counts_unmasked_pairs_and_recompute_is_apart():
    shape = tiny_shape()
    full = flops_per_sample(shape, 40)
    causal = flops_per_sample(shape, 40, causal=True)
    assert causal.attention.forward == pytest.approx(full.attention.forward * (40 * 41 / 2) / 40**2)
    ckpt = step_flops(shape, [40], recompute_fraction=1.0, stage="finetune")
    plain = step_flops(shape, [40], stage="finetune")
    assert ckpt.total == plain.total  # model FLOPs exclude recomputation
    assert ckpt.recompute == plain.decoder.forward + plain.attention.forward
    assert plain.scaled(2.5).total == pytest.approx(2.5 * plain.total)


def test_siglip_tower_with_pooling_head():
    text = AutoConfig.for_model("llama", **LLAMA)
    with_head = VLMShape.from_configs(text, AutoConfig.for_model("siglip_vision_model", **CLIP))
    no_head = VLMShape.from_configs(text, AutoConfig.for_model("siglip_vision_model", vision_use_head=False, **CLIP))
    seq = 16  # no class token
    assert with_head.image_tokens == no_head.image_tokens == seq and with_head.select_strategy == "full"
    a, b = (flops_per_sample(s, 40, stage="full") for s in (with_head, no_head))
    head = 2 * (2 * seq * 32 * 32) + 2 * 32 * 32 + 2 * 32 * 32 + 2 * 32 * 64 + 2 * 64 * 32  # k,v; q; out; MLP
    assert a.vision.forward - b.vision.forward == head
    assert a.vision_attention.forward - b.vision_attention.forward == 2 * seq * 32 + 2 * seq * 32
    assert a.vision.backward == b.vision.backward  # the head's output is unused: no gradient reaches it
    assert b.vision.forward == 2 * seq * 3 * 64 * 32 + 3 * (4 * 2 * seq * 32 * 32 + 2 * 2 * seq * 32 * 64)


def test_logit_tokens_default_to_every_position():
    shape = tiny_shape()
    assert flops_per_sample(shape, 40).lm_head.forward == 2 * 40 * 64 * 100


@pytest.mark.parametrize("model_type,kw", [
    ("llama", LLAMA),
    ("llama", {**LLAMA, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {**LLAMA, "tie_word_embeddings": True}),
    ("mistral", {**LLAMA, "head_dim": 32}),
    ("qwen3", {**LLAMA, "head_dim": 32}),
])
def test_decoder_params_match_transformers(model_type, kw):
    cfg = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shape = DecoderShape.from_config(cfg)
    assert sum(n for _, n in shape.tensors()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type,kw", [
    ("clip_vision_model", CLIP),
    ("siglip_vision_model", CLIP),
    ("siglip_vision_model", {**CLIP, "vision_use_head": False}),
])
def test_vision_params_match_transformers(model_type, kw):
    cfg = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    shape = VisionShape.from_config(cfg)
    assert sum(n for _, n in shape.tensors()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("text,vision,strategy,image_tokens,bias", [
    (("llama", LLAMA), ("clip_vision_model", CLIP), "default", 16, True),
    (("qwen2", {**LLAMA, "tie_word_embeddings": True}), ("siglip_vision_model", CLIP), "full", 16, True),
    (("llama", LLAMA), ("clip_vision_model", CLIP), "full", 17, False),
])
def test_whole_llava_params_and_image_tokens(text, vision, strategy, image_tokens, bias):
    cfg = LlavaConfig(text_config=AutoConfig.for_model(text[0], **text[1]).to_dict(),
                      vision_config=AutoConfig.for_model(vision[0], **vision[1]).to_dict(),
                      vision_feature_select_strategy=strategy, multimodal_projector_bias=bias)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    shape = VLMShape.from_llava_config(cfg)
    counts = count_params(shape)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.projector == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert shape.image_tokens == image_tokens
    assert counts.trainable("align") == counts.projector
    assert counts.trainable("finetune") == counts.projector + counts.llm
    assert counts.frozen("full") == 0


@pytest.mark.parametrize("kind,n_weights", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_kinds(kind, n_weights):
    shape = VLMShape.from_configs(AutoConfig.for_model("llama", **LLAMA),
                                  AutoConfig.for_model("clip_vision_model", **CLIP), kind)
    assert count_params(shape).projector == 32 * 64 + 64 + (n_weights - 1) * (64 * 64 + 64)
    assert flops_per_sample(shape, 40).projector.forward == 2 * 16 * (32 * 64 + (n_weights - 1) * 64 * 64)


def test_mfu_and_peaks():
    assert PEAK_FLOPS["h100"] == PEAK_FLOPS["h200"] == 989e12 and PEAK_FLOPS["a100"] == 312e12
    # 8 GPUs for 2 s at a quarter of the peak.
    assert mfu(0.25 * 989e12 * 8 * 2, 2.0, 8, peak_flops("H100")) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1, 1.0)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    with pytest.raises(ValueError, match="valid"):
        peak_flops("Tesla V100-SXM2-16GB")


def test_unsupported_shapes_are_refused():
    with pytest.raises(ValueError, match="gpt2"):
        DecoderShape.from_config(AutoConfig.for_model("gpt2"))
    with pytest.raises(ValueError, match="stage"):
        step_flops(tiny_shape(), [40], stage="pretrain")


def test_image_tokens_per_image_are_the_callers_to_give():
    h = hand_forward()
    # 40 decoder positions per image (e.g. several tiles) instead of the shape's 16: the projector scales with them.
    f = step_flops(tiny_shape(), LENS, images=2, logit_tokens=LOGITS, stage="full", image_tokens=40)
    assert f.projector.forward == h["projector"] * 40 / 16
    assert f.decoder.forward == h["decoder"]  # decoder lengths already count the image positions
