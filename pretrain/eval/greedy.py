"""Greedy decoding straight from the training module (VLMForTraining), with a KV cache.

Why not `LlavaForConditionalGeneration.generate`: going through VLMForTraining.embed keeps evaluation on exactly the
image path the training loss used (including the test switch that breaks it), and needs no export first.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from pretrain.model.vlm import VLMForTraining


def caption_prompt(tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_tokens: int) -> list[int]:
    """The pretraining caption format without its text: `[bos] <image>*N` (pretrain.data.text.TextProcessor)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + [image_token_id] * image_tokens


def question_prompt(tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_tokens: int,
                    question: str) -> list[int]:
    """A user turn `<image>\\nQUESTION` in the tokenizer's chat template, opened for the assistant's answer, with the
    image placeholder expanded as TextProcessor.conversation does."""
    messages = [{"role": "user", "content": "<image>\n" + question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids += [t] * image_tokens if t == image_token_id else [t]
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: eos, and the chat template's end-of-turn token (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`...), found by rendering an assistant turn and taking the first token after its content: the model
    was trained to produce it there (TextProcessor labels the whole rendered turn)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template is None:
        return ids
    marker = "XYZZY"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text[text.index(marker) + len(marker):].lstrip(" ")
    after = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return ids + [after[0]] if after and after[0] not in ids else ids


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_generate(module: VLMForTraining, prompts: list[list[int]], pixel_values: torch.Tensor,
                    stop: int | list[int], max_new_tokens: int = 32) -> list[list[int]]:
    """New token ids for each prompt (one image each, in order), up to and excluding the first stop token."""
    stop_t = torch.tensor([stop] if isinstance(stop, int) else list(stop), device=module.param_device())
    vlm = module.vlm
    device = module.param_device()
    ids, mask = _left_pad(prompts, module.pad_id(), device)
    embeds = module.embed(ids, pixel_values.to(device, module.dtype))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    lm = vlm.model.language_model
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    result: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = vlm.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        ends = torch.isin(nxt, stop_t)
        for i in torch.nonzero(~done & ~ends).flatten().tolist():
            result[i].append(int(nxt[i]))
        done |= ends
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = lm(inputs_embeds=vlm.get_input_embeddings()(nxt[:, None]), attention_mask=mask, position_ids=positions,
                 past_key_values=out.past_key_values, use_cache=True)
    return result
