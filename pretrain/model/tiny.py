"""Tiny local models for the demo and the tests: no hub access, but the same `from_pretrained` paths.

A byte-level BPE tokenizer trained on the given texts (so any UTF-8 text encodes), a ChatML-style chat template, and
randomly initialised decoders / vision towers saved as ordinary Hugging Face directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

# ChatML: the format Qwen2 uses; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]

DECODER_SHAPES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True},
}
VISION_SHAPES: dict[str, dict[str, Any]] = {
    "clip": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
}


def build_tokenizer(texts: list[str], vocab_size: int = 512, image_and_pad: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (plus the byte alphabet, so nothing is ever unknown).

    `image_and_pad=False` leaves out <image> and <pad>, like most LLM tokenizers: the model builder must add them."""
    specials = [t for t in SPECIAL_TOKENS if image_and_pad or t not in ("<pad>", "<image>")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>" if image_and_pad else None,
        additional_special_tokens=[t for t in specials if t not in ("<s>", "</s>", "<pad>")])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_decoder(out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, family: str = "llama",
                       seed: int = 0, **overrides: Any) -> Path:
    """A random-init decoder of `family` saved with its tokenizer, loadable by AutoModelForCausalLM."""
    import torch

    fields = {**DECODER_SHAPES[family], **overrides}
    model_type = fields.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_vision(out_dir: str | Path, family: str = "clip", seed: int = 0, **overrides: Any) -> Path:
    """A random-init CLIP/SigLIP vision tower saved with the image processor that matches it."""
    import torch

    from pretrain.data.image import image_processor_for_vision_config

    fields = {**VISION_SHAPES[family], **overrides}
    model_type = fields.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg)
    out = Path(out_dir)
    model.save_pretrained(out)
    image_processor_for_vision_config(cfg).save_pretrained(out)
    return out
