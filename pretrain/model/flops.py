"""Parameter counts and FLOPs of a LLaVA-style VLM, from Hugging Face configs: the trainer's MFU and the planner.

Conventions (those of torchtitan, Megatron-LM and the PaLM paper, so that MFU figures compare):
- A matmul of an [n, k] activation by a [k, m] weight costs 2*n*k*m FLOPs forward: "2 x params x tokens" over the
  matmul weights. Biases, norms, activations, softmax, rotary and embedding lookups are not counted (well under 1%).
- Attention scores (Q K^T) and values (P V) cost 2*L^2*d FLOPs each per sample and layer in the forward pass
  (d = query heads x head_dim), with L the sample's own length: in a packed row each sample attends only to itself,
  so a row of samples L_i costs sum(L_i^2), not (sum L_i)^2. The causal mask is not discounted (as torchtitan,
  Megatron and PaLM count); `causal=True` counts only the L(L+1)/2 unmasked pairs that flash kernels compute.
- Backward by what trains. A weight matmul's backward is two matmuls of its forward size: the activation gradient
  (needed when the layer or anything upstream of it trains) and the weight gradient (only when it trains).
  Attention scores/values have no weights: their backward is 2x forward whenever gradients flow through them.
  So `full` is ~3x forward everywhere; `align` runs the vision tower forward only, the projector ~2x, and the
  frozen decoder 1x (+2x attention) because gradients must reach the image tokens; `finetune` trains the decoder (3x).
- The vision tower runs all its layers (transformers' Llava takes hidden_states[vision_feature_layer] from a full
  pass), but only the layers up to the selected one get gradients when the tower trains.
- "Model FLOPs" (what MFU divides) exclude activation-checkpointing recomputation; `recompute` reports it apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from pretrain.model.components import VISION_TYPES

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), from the vendors' data sheets (SXM / OAM parts unless named).
# The one table of peaks: mfu() here and `pretrain plan --gpu` (pretrain/plan/estimate.py) both read it. Short keys
# (`a100`) also match device names ("NVIDIA A100-SXM4-80GB") in peak_flops().
PEAK_FLOPS: dict[str, float] = {
    "a100": 312e12, "a100-40gb": 312e12, "a100-80gb": 312e12, "h100": 989e12, "h100-pcie": 756e12,
    "h200": 989e12, "l40s": 362e12, "mi300x": 1307e12, "b200": 2250e12,
}

# What each `train.stage` trains: the one table, read by the cost model here and by freezing (pretrain.model.stages).
STAGE_TRAINABLE: dict[str, frozenset[str]] = {
    "align": frozenset({"projector"}),
    "finetune": frozenset({"projector", "llm"}),
    "full": frozenset({"vision", "projector", "llm"}),
}
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PROJECTOR_DEPTH = {"mlp2x_gelu": 2, "linear": 1, "mlp3x_gelu": 3}  # linear layers of each projector kind

Tensors = list[tuple[str, int]]  # (parameter name, numel), the shapes of what a real module would hold


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-family decoder (SwiGLU MLP, RMSNorm, GQA): what its parameters and FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> DecoderShape:
        if hasattr(cfg, "text_config"):  # a Llava (or other composite) config: take its decoder
            cfg = cfg.get_text_config()
        kind = cfg.model_type
        if kind not in DECODER_TYPES:
            raise ValueError(f"no FLOPs model for decoder model_type {kind!r} (valid: {', '.join(DECODER_TYPES)})")
        heads = cfg.num_attention_heads
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers, heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            # Qwen2 hard-codes biases on q/k/v; Llama and Qwen3 follow `attention_bias`; Mistral has none.
            qkv_bias=kind == "qwen2" or (kind in ("llama", "qwen3") and attn_bias),
            o_bias=kind in ("llama", "qwen3") and attn_bias,
            mlp_bias=kind == "llama" and bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=kind == "qwen3",
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * i

    def layer_tensors(self, prefix: str) -> Tensors:
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        out: Tensors = []
        for name, n_in, n_out, bias in (("q_proj", h, q, self.qkv_bias), ("k_proj", h, kv, self.qkv_bias),
                                        ("v_proj", h, kv, self.qkv_bias), ("o_proj", q, h, self.o_bias)):
            out += _linear(f"{prefix}self_attn.{name}", n_in, n_out, bias)
        if self.qk_norm:
            out += [(f"{prefix}self_attn.q_norm.weight", self.head_dim), (f"{prefix}self_attn.k_norm.weight",
                                                                          self.head_dim)]
        for name, n_in, n_out in (("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)):
            out += _linear(f"{prefix}mlp.{name}", n_in, n_out, self.mlp_bias)
        return out + [(f"{prefix}input_layernorm.weight", h), (f"{prefix}post_attention_layernorm.weight", h)]

    def tensors(self) -> Tensors:
        out: Tensors = [("embed_tokens.weight", self.vocab * self.hidden)]
        for layer in range(self.layers):
            out += self.layer_tensors(f"layers.{layer}.")
        out.append(("norm.weight", self.hidden))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", self.vocab * self.hidden))
        return out


@dataclass(frozen=True)
class VisionShape:
    """A CLIP or SigLIP vision tower (ViT with biased linears, LayerNorm, GELU MLP)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3
    class_token: bool = True  # CLIP prepends one; SigLIP has none
    pooling_head: bool = False  # SigLIP's attention-pooling head (runs, though Llava does not use its output)

    @classmethod
    def from_config(cls, cfg: Any) -> VisionShape:
        if hasattr(cfg, "vision_config"):  # a two-tower CLIP/SigLIP or a Llava config: take the vision tower
            cfg = cfg.vision_config
        kind = cfg.model_type
        if kind not in VISION_TYPES:
            raise ValueError(f"no FLOPs model for vision model_type {kind!r} (valid: {', '.join(VISION_TYPES)})")
        clip = kind == "clip_vision_model"
        return cls(
            hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            channels=getattr(cfg, "num_channels", 3), class_token=clip,
            pooling_head=not clip and bool(getattr(cfg, "vision_use_head", True)),
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq(self) -> int:
        return self.patches + int(self.class_token)

    @property
    def patch_params(self) -> int:
        return self.channels * self.patch_size**2 * self.hidden

    @property
    def layer_matmul_params(self) -> int:
        return 4 * self.hidden**2 + 2 * self.hidden * self.intermediate

    def tensors(self) -> Tensors:
        h, i = self.hidden, self.intermediate
        out: Tensors = [("embeddings.patch_embedding.weight", self.patch_params),
                        ("embeddings.position_embedding.weight", self.seq * h)]
        if self.class_token:  # CLIP: class embedding, bias-free patch conv, a LayerNorm before the encoder
            out += [("embeddings.class_embedding", h), ("pre_layrnorm.weight", h), ("pre_layrnorm.bias", h)]
        else:
            out.append(("embeddings.patch_embedding.bias", h))
        for layer in range(self.layers):
            p = f"encoder.layers.{layer}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out += _linear(f"{p}self_attn.{name}", h, h, True)
            out += _linear(f"{p}mlp.fc1", h, i, True) + _linear(f"{p}mlp.fc2", i, h, True)
            out += _layernorm(f"{p}layer_norm1", h) + _layernorm(f"{p}layer_norm2", h)
        out += _layernorm("post_layernorm", h)
        if self.pooling_head:
            out += [("head.probe", h), ("head.attention.in_proj_weight", 3 * h * h), ("head.attention.in_proj_bias",
                                                                                       3 * h)]
            out += _linear("head.attention.out_proj", h, h, True) + _layernorm("head.layernorm", h)
            out += _linear("head.mlp.fc1", h, i, True) + _linear("head.mlp.fc2", i, h, True)
        return out


def projector_tensors(kind: str, n_in: int, n_out: int, bias: bool = True) -> Tensors:
    """`linear`: one layer; `mlp2x_gelu` (LLaVA-1.5, transformers' Llava): in->out, GELU, out->out; `mlp3x_gelu`."""
    depth = PROJECTOR_DEPTH.get(kind)
    if depth is None:
        raise ValueError(f"unknown projector {kind!r} (valid: {', '.join(PROJECTOR_DEPTH)})")
    out: Tensors = []
    for k in range(depth):
        out += _linear(f"linear_{k + 1}", n_in if k == 0 else n_out, n_out, bias)
    return out


@dataclass(frozen=True)
class VLMShape:
    """Decoder + vision tower + projector, and how image features reach the decoder."""

    llm: DecoderShape
    vision: VisionShape
    projector: str = "mlp2x_gelu"
    select_strategy: str = "default"  # `default` drops CLIP's class token, `full` keeps every position
    feature_layers: tuple[int, ...] = (-2,)
    projector_bias: bool = True

    @classmethod
    def from_configs(cls, text_config: Any, vision_config: Any, projector: str = "mlp2x_gelu",
                     select_strategy: str | None = None, vision_feature_layer: int | Sequence[int] = -2) -> VLMShape:
        vision = VisionShape.from_config(vision_config)
        strategy = select_strategy or ("default" if vision.class_token else "full")
        layers = (vision_feature_layer,) if isinstance(vision_feature_layer, int) else tuple(vision_feature_layer)
        return cls(DecoderShape.from_config(text_config), vision, projector, strategy, layers)

    @classmethod
    def from_llava_config(cls, cfg: Any, projector: str = "mlp2x_gelu") -> VLMShape:
        """The shape of a transformers LlavaConfig (what the trainer holds after building the model)."""
        shape = cls.from_configs(cfg.get_text_config(), cfg.vision_config, projector,
                                 cfg.vision_feature_select_strategy, cfg.vision_feature_layer)
        return replace(shape, projector_bias=bool(getattr(cfg, "multimodal_projector_bias", True)))

    @property
    def image_tokens(self) -> int:
        """Decoder positions per image: patches, plus the class token where kept."""
        keep_cls = self.vision.class_token and self.select_strategy == "full"
        return self.vision.patches + int(keep_cls)

    @property
    def projector_in(self) -> int:
        return self.vision.hidden * len(self.feature_layers)

    @property
    def vision_grad_layers(self) -> int:
        """Encoder layers whose output reaches the selected features (hidden_states[k] is layer k's output)."""
        return max(k % (self.vision.layers + 1) for k in self.feature_layers)

    def projector_tensors(self) -> Tensors:
        return projector_tensors(self.projector, self.projector_in, self.llm.hidden, self.projector_bias)

    def tensors(self) -> Tensors:
        """Every parameter tensor, named by component (`vision.`, `projector.`, `llm.`)."""
        return ([("vision." + n, k) for n, k in self.vision.tensors()]
                + [("projector." + n, k) for n, k in self.projector_tensors()]
                + [("llm." + n, k) for n, k in self.llm.tensors()])


@dataclass(frozen=True)
class ParamCounts:
    vision: int
    projector: int
    llm: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm

    def trainable(self, stage: str | Iterable[str]) -> int:
        trained = trainable_components(stage)
        return sum(getattr(self, c) for c in ("vision", "projector", "llm") if c in trained)

    def frozen(self, stage: str | Iterable[str]) -> int:
        return self.total - self.trainable(stage)


def count_params(shape: VLMShape) -> ParamCounts:
    """Parameters per component, equal to sum(p.numel()) of the transformers modules built from the same configs."""
    return ParamCounts(vision=_numel(shape.vision.tensors()), projector=_numel(shape.projector_tensors()),
                       llm=_numel(shape.llm.tensors()))


def trainable_components(stage: str | Iterable[str]) -> frozenset[str]:
    """`align` | `finetune` | `full`, or an explicit set drawn from {vision, projector, llm}."""
    if isinstance(stage, str):
        if stage not in STAGE_TRAINABLE:
            raise ValueError(f"unknown stage {stage!r} (valid: {', '.join(STAGE_TRAINABLE)})")
        return STAGE_TRAINABLE[stage]
    trained = frozenset(stage)
    if trained - {"vision", "projector", "llm"}:
        raise ValueError(f"unknown trainable components {sorted(trained - {'vision', 'projector', 'llm'})}")
    return trained


@dataclass(frozen=True)
class Cost:
    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward


_PARTS = ("decoder", "attention", "lm_head", "vision", "vision_attention", "projector")


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one forward+backward over a batch, by component."""

    decoder: Cost  # decoder weight matmuls (all layers)
    attention: Cost  # decoder attention scores + values
    lm_head: Cost
    vision: Cost  # vision tower weight matmuls (patch embedding, layers, pooling head)
    vision_attention: Cost
    projector: Cost
    recompute: float = 0.0  # activation-checkpointing re-forward: hardware work, not model FLOPs
    tokens: int = 0
    samples: int = 0
    images: int = 0
    logit_tokens: int = 0

    @property
    def forward(self) -> float:
        return sum(getattr(self, p).forward for p in _PARTS)

    @property
    def backward(self) -> float:
        return sum(getattr(self, p).backward for p in _PARTS)

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def scaled(self, k: float) -> StepFlops:
        """The FLOPs of k times this batch (k may be fractional: samples per packed row on average)."""
        costs = {p: Cost(getattr(self, p).forward * k, getattr(self, p).backward * k) for p in _PARTS}
        return StepFlops(**costs, recompute=self.recompute * k, tokens=round(self.tokens * k),
                         samples=round(self.samples * k), images=round(self.images * k),
                         logit_tokens=round(self.logit_tokens * k))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "forward": self.forward, "backward": self.backward, "total": self.total}


def step_flops(shape: VLMShape, sample_lens: Sequence[int], images: int | None = None,
               logit_tokens: int | None = None, stage: str | Iterable[str] = "full", causal: bool = False,
               recompute_fraction: float = 0.0, image_tokens: int | None = None) -> StepFlops:
    """FLOPs of one forward+backward over samples of decoder lengths `sample_lens` (image tokens included).

    `images` (vision tower passes: images, or with AnyRes their tiles, each projected before unpadding) defaults
    to one per sample; `logit_tokens` (positions where the LM head runs) to every token, pass the
    label count when logits are computed only there. `recompute_fraction`: share of the decoder (and, when it
    trains, vision) layers under activation checkpointing, reported as `recompute`. `image_tokens`: decoder
    positions per image through the projector, `shape.image_tokens` unless the caller knows better.
    """
    tokens = int(sum(sample_lens))
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in sample_lens)
    return batch_flops(shape, tokens, pairs, len(sample_lens), len(sample_lens) if images is None else images,
                       tokens if logit_tokens is None else logit_tokens, stage, recompute_fraction, image_tokens)


def batch_flops(shape: VLMShape, tokens: float, pairs: float, samples: int, images: float, logit_tokens: float,
                stage: str | Iterable[str] = "full", recompute_fraction: float = 0.0,
                image_tokens: int | None = None) -> StepFlops:
    """FLOPs of one forward+backward over `tokens` decoder positions whose attention covers `pairs` (query, key)
    pairs: step_flops' arithmetic for a batch described by its totals. The planner prices a padded batch with it
    (the decoder's matmuls run over the padding too, a dense-mask kernel over width^2 pairs per row)."""
    trained = trainable_components(stage)
    n_img, n_logit = images, logit_tokens
    vis_tr, proj_tr, llm_tr = ("vision" in trained), ("projector" in trained), ("llm" in trained)
    grads_into_llm = bool(trained)  # every trainable component sits upstream of, or in, the decoder

    llm = shape.llm
    dec_fwd = 2.0 * tokens * llm.layers * llm.layer_matmul_params
    att_fwd = 4.0 * llm.layers * llm.q_dim * pairs
    head_fwd = 2.0 * n_logit * llm.hidden * llm.vocab
    decoder = _weight_cost(dec_fwd, act=grads_into_llm, weight=llm_tr)
    attention = Cost(att_fwd, 2 * att_fwd if grads_into_llm else 0.0)
    lm_head = _weight_cost(head_fwd, act=grads_into_llm, weight=llm_tr)

    vision, vision_attention = _vision_costs(shape, n_img, vis_tr)

    feat = n_img * (shape.image_tokens if image_tokens is None else image_tokens)
    proj = [2.0 * feat * n for n in _linear_weights(shape.projector_tensors())]
    # Weight gradients when it trains; input gradients of the first layer only for a training tower upstream.
    proj_bwd = sum(proj) * proj_tr + proj[0] * vis_tr + sum(proj[1:]) * (proj_tr or vis_tr)
    projector = Cost(sum(proj), proj_bwd)

    recompute = recompute_fraction * (dec_fwd + att_fwd + (vision.forward + vision_attention.forward) * vis_tr)
    return StepFlops(decoder, attention, lm_head, vision, vision_attention, projector, recompute,
                     tokens=round(tokens), samples=samples, images=round(n_img), logit_tokens=round(n_logit))


def flops_per_sample(shape: VLMShape, sample_len: int, images: int = 1, logit_tokens: int | None = None,
                     stage: str | Iterable[str] = "full", causal: bool = False) -> StepFlops:
    return step_flops(shape, [sample_len], images, logit_tokens, stage, causal)


def mfu(flops: float, seconds: float, n_gpus: int, peak: float | str | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the dense peak of all GPUs; the one formula that the
    trainer's metrics, `pretrain bench train` and `pretrain plan` use.

    `peak`: FLOP/s per GPU, or a GPU named as peak_flops() takes it. None where there is nothing to divide by: no
    accelerator (`peak` None, as on CPU), a device of unknown peak, or no model FLOPs counted (no FLOPs model)."""
    if seconds <= 0 or n_gpus <= 0:
        raise ValueError(f"seconds and n_gpus must be positive (got {seconds}, {n_gpus})")
    if isinstance(peak, str):
        try:
            peak = peak_flops(peak)
        except ValueError:
            return None
    if peak is None or flops <= 0:
        return None
    if peak <= 0:
        raise ValueError(f"peak must be positive (got {peak})")
    return flops / (seconds * n_gpus * peak)


def peak_flops(gpu: str) -> float:
    """Peak of a GPU named by key (`h100`) or by `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3")."""
    name = "-".join(gpu.lower().split())
    matches = [key for key in PEAK_FLOPS if key in name]
    if not matches:
        raise ValueError(f"unknown GPU {gpu!r} (valid: {', '.join(PEAK_FLOPS)})")
    return PEAK_FLOPS[max(matches, key=len)]


def _vision_costs(shape: VLMShape, n_img: int, trains: bool) -> tuple[Cost, Cost]:
    vis = shape.vision
    h, n = vis.hidden, vis.seq
    patch = 2.0 * vis.patches * vis.patch_params
    layer = 2.0 * n * vis.layer_matmul_params
    att_layer = 4.0 * n * n * h
    # SigLIP's pooling head: k/v over all positions, one probe query, an MLP on one token.
    head = 2.0 * (2 * h * h * n + 2 * h * h + 2 * h * vis.intermediate) if vis.pooling_head else 0.0
    head_att = 4.0 * n * h if vis.pooling_head else 0.0
    fwd = n_img * (patch + vis.layers * layer + head)
    att_fwd = n_img * (vis.layers * att_layer + head_att)
    if not trains:
        return Cost(fwd), Cost(att_fwd)
    g = shape.vision_grad_layers
    # Layers past the selected feature layer (and the head) get no gradient; the patch conv needs no input grad.
    bwd = n_img * (2 * g * layer + patch)
    return Cost(fwd, bwd), Cost(att_fwd, n_img * 2 * g * att_layer)


def _weight_cost(fwd: float, act: bool, weight: bool) -> Cost:
    return Cost(fwd, fwd * act + fwd * weight)


def _linear(name: str, n_in: int, n_out: int, bias: bool) -> Tensors:
    return [(f"{name}.weight", n_in * n_out)] + ([(f"{name}.bias", n_out)] if bias else [])


def _layernorm(name: str, n: int) -> Tensors:
    return [(f"{name}.weight", n), (f"{name}.bias", n)]


def _linear_weights(tensors: Tensors) -> list[int]:
    return [n for name, n in tensors if name.endswith(".weight")]


def _numel(tensors: Tensors) -> int:
    return sum(n for _, n in tensors)
