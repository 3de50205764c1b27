"""One rank of the vision-split check (run by torchrun on 2 gloo ranks): the VLM's vision path with `vision_group`
set to a group of both ranks against the plain path on the same micro-batch.

Each case runs the plain path once and sums every rank's loss (so each rank holds the whole reference gradient),
then the split path with this rank's loss only, its gradients summed over the group (as the data-parallel
reduction of a sequence-parallel run sums them). Rank r's loss is the features weighted by weights of seed r, so
the ranks' losses differ and a gather whose backward drops another rank's use of a tile shows. A forward hook counts
the tiles each tower call takes. Writes OUT.rank<R>.json."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from helpers.clips import video_config
from pretrain import distributed
from pretrain.config import ModelConfig
from pretrain.demo import tokenizer_corpus
from pretrain.model.build import build_model
from pretrain.model.tiny import DECODER_SHAPES, VISION_SHAPES, build_tokenizer
from pretrain.model.vision_split import encode_split
from pretrain.model.vlm import VLMForTraining
from pretrain.tokens import VIDEO_TOKEN


def weights(like: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(100 + rank))


def features(wrapper: VLMForTraining, pixels, sizes, video) -> torch.Tensor:
    images, clips, _ = wrapper.visual_features(pixels, sizes, video)
    return torch.cat([images.flatten()] + ([] if clips is None else [clips.flatten()]))


def trained(wrapper: VLMForTraining) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in wrapper.named_parameters()
            if p.requires_grad and ("vision_tower" in n or "multi_modal_projector" in n)}


def grads(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params.values()])


@contextlib.contextmanager
def tiles_seen(tower: torch.nn.Module) -> Iterator[list[int]]:
    """The tile count of every call of `tower` inside (a forward hook)."""
    rows: list[int] = []
    hook = tower.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        hook.remove()


def case(wrapper: VLMForTraining, group, rank: int, world: int, pixels=None, sizes=None, video=None) -> dict:
    tower = wrapper.vlm.model.vision_tower
    params = trained(wrapper)
    wrapper.vision_group = None
    wrapper.zero_grad(set_to_none=True)
    with tiles_seen(tower) as plain_rows:
        plain = features(wrapper, pixels, sizes, video)
    sum((weights(plain, r) * plain).sum() for r in range(world)).backward()
    plain_grads = grads(params)
    wrapper.vision_group = group
    wrapper.zero_grad(set_to_none=True)
    with tiles_seen(tower) as rows:
        split = features(wrapper, pixels, sizes, video)
    (weights(split, rank) * split).sum().backward()
    split_grads = distributed.all_reduce(grads(params), group=group)
    tower_grads = [p.grad is not None for n, p in params.items() if "vision_tower" in n]
    return {"plain_rows": plain_rows, "split_rows": rows, "features": split.numel(),
            "feature_diff": (split - plain).abs().max().item(),
            "grad_diff": ((split_grads - plain_grads).abs().max() / plain_grads.abs().max()).item(),
            "tower_params_with_grad": sum(tower_grads), "tower_params": len(tower_grads),
            "projector_grad_norm": sum(p.grad.norm().item() for n, p in params.items() if "projector" in n)}


def no_tiles(wrapper: VLMForTraining, group) -> dict:
    """encode_split over an empty tile batch (where the plain tower call fails: CLIP cannot reshape 0 tiles): every
    rank still runs the tower once, on a black tile, and none comes back."""
    tower = wrapper.vlm.model.vision_tower
    with tiles_seen(tower) as rows:
        split = encode_split(lambda px: tower(px).last_hidden_state, torch.zeros(0, 3, 32, 32), group)
    return {"rows": rows, "shape": list(split.shape)}


def zero3(mcfg: ModelConfig, tokenizer, group) -> dict:
    """Under ZeRO-3 (the tower partitioned, trained), the same micro-batch on both ranks: the split run's loss and
    gradients equal the plain run's (each rank's tower grads its half of the tiles twice over, the data-parallel
    mean makes the whole), and the tower takes half of the tiles per call."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from pretrain.data.batching import collate
    from pretrain.data.sample import ProcessedSample
    from pretrain.model.build import ZeroContext
    from pretrain.tokens import IGNORE

    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "zero_optimization": {"stage": 3},
          "zero_force_ds_cpu_optimizer": False}
    out = {}
    for name, vision_group in (("plain", None), ("split", group)):
        keep = HfDeepSpeedConfig(ds)
        module = VLMForTraining(build_model(mcfg, tokenizer, ZeroContext(ds), seed=0))
        module.vision_group = vision_group
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        distributed.skip_shm_op_build()
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds)
        del keep
        cfg, g = module.vlm.config, torch.Generator().manual_seed(5)  # the same samples on both ranks
        head = [cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.image_seq_length * 3 + [10, 11]
        body = torch.randint(20, 300, (12,), generator=g).tolist()
        sample = ProcessedSample(head + body, [IGNORE] * len(head) + body, torch.randn(3, 3, 32, 32, generator=g),
                                 image_tiles=[1, 1, 1])
        with tiles_seen(module.vlm.model.vision_tower) as rows:
            loss, n = engine(collate([[sample]], tokenizer.pad_token_id))
        engine.backward(loss / int(n))
        full = torch.cat([safe_get_full_grad(p).flatten() for p in module.parameters() if p.requires_grad])
        out[name] = {"loss": loss.item(), "grads": full, "rows": rows}
    plain, split = out["plain"], out["split"]
    return {"losses": [plain["loss"], split["loss"]], "rows": [plain["rows"], split["rows"]],
            "grad_diff": ((split["grads"] - plain["grads"]).norm() / plain["grads"].norm()).item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    group = distributed.new_group(range(world))
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tokenizer_corpus(), vocab_size=400)
    mcfg = ModelConfig(llm=dict(DECODER_SHAPES["llama"]), vision=dict(VISION_SHAPES["clip"]))
    llava = VLMForTraining(build_model(mcfg, tokenizer))
    g = torch.Generator().manual_seed(1)
    three = torch.randn(3, 3, 32, 32, generator=g)
    out = {"tiles3": case(llava, group, rank, world, three),
           "text_only": case(llava, group, rank, world),
           "no_tiles": no_tiles(llava, group)}
    out["zero3"] = zero3(mcfg, tokenizer, group)
    llava.vlm.model.vision_tower.requires_grad_(False)
    out["tiles3_frozen"] = case(llava, group, rank, world, three)
    tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    video = VLMForTraining(build_model(video_config("siglip").model, tokenizer))  # LlavaNextVideo: a video token
    assert type(video.vlm).__name__ == "LlavaNextVideoForConditionalGeneration"
    tiles = torch.randn(3, 3, 32, 32, generator=g)  # an image of 32 x 64: a 1 x 2 grid and the base tile
    frames = torch.randn(4, 3, 32, 32, generator=g)
    out["anyres_video"] = case(video, group, rank, world, tiles, [(32, 64)], frames)
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(out, f)
    distributed.finish(0)


if __name__ == "__main__":
    main()
