"""Vision-tower FLOPs per rank of a sequence-parallel group, with and without the split of the tower's work
(pretrain.model.vision_split), counted by torch's FlopCounterMode on the calls each rank makes.

Each rank of a group of N runs the tower on `rank_slice(tiles, rank, N)` (its 1/N of the micro-batch's tiles and
frames, padded with black tiles to the same count on every rank); without the split every rank runs it on all of
them. The towers are built on the meta device (shapes only: nothing is computed, so real sizes cost nothing) and
FlopCounterMode counts the matmuls and attention of the forward (a frozen tower: align, finetune) and of the forward
+ backward (a trained tower, the loss on the feature layer -2 as Llava selects it). The cost model's forward
(pretrain.model.flops) per tile is printed beside the count.

    python tools/vision_split_flops.py [--worlds 1 2 4 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, LlamaConfig

from pretrain.model.flops import VLMShape, batch_flops
from pretrain.model.vision_split import rank_slice, rows_per_rank

TOWERS = {  # the towers of LLaVA-NeXT (CLIP ViT-L/14-336) and LLaVA-OneVision (SigLIP-so400m/14-384)
    "clip-l-336": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
    "siglip-so400m-384": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
}
WORKLOADS = {  # tower passes of one micro-batch
    "1 AnyRes image, 3x3 grid + base": 10,
    "32-frame clip": 32,
    "2 AnyRes images (2x2 + base) + 32 frames": 42,
}


def tower_flops(tower: torch.nn.Module, tiles: int, size: int, trains: bool) -> int:
    """FLOPs of one tower call on `tiles` tiles (forward, + backward from layer -2 when `trains`)."""
    pixels = torch.zeros(tiles, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(trains):
        out = tower(pixels, output_hidden_states=True)
        if trains:
            out.hidden_states[-2].sum().backward()
    return counter.get_total_flops()


def model_forward_per_tile(cfg) -> float:
    """The cost model's tower forward per tile (weight matmuls + attention)."""
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=64)
    cost = batch_flops(VLMShape.from_configs(text, cfg), 0, 0, 0, 1, 0, stage="align")
    return cost.vision.forward + cost.vision_attention.forward


def measure(worlds: list[int]) -> list[dict]:
    rows = []
    for name, fields in TOWERS.items():
        fields = dict(fields)
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            tower = AutoModel.from_config(cfg)
        per_tile = {t: tower_flops(tower, 1, cfg.image_size, t) for t in (False, True)}
        for workload, tiles in WORKLOADS.items():
            pixels = torch.zeros(tiles, 3, cfg.image_size, cfg.image_size, device="meta")
            unsplit = {t: tower_flops(tower, tiles, cfg.image_size, t) for t in (False, True)}
            for world in worlds:
                slices = [rank_slice(pixels, r, world).shape[0] for r in range(world)]
                assert len(set(slices)) == 1 and slices[0] == rows_per_rank(tiles, world)
                row = {"tower": name, "workload": workload, "tiles": tiles, "world": world,
                       "tiles_per_rank": slices[0], "cost_model_forward_per_tile": model_forward_per_tile(cfg)}
                for trains, key in ((False, "forward"), (True, "forward_backward")):
                    split = tower_flops(tower, slices[0], cfg.image_size, trains)
                    assert split == slices[0] * per_tile[trains] and unsplit[trains] == tiles * per_tile[trains]
                    row[f"{key}_per_rank_unsplit"], row[f"{key}_per_rank_split"] = unsplit[trains], split
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    rows = measure(args.worlds)
    print("| tower | micro-batch | tiles | N | tiles/rank | fwd TFLOP/rank unsplit | split | fwd+bwd unsplit | split |"
          " split/unsplit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = 1e12
        print(f"| {r['tower']} | {r['workload']} | {r['tiles']} | {r['world']} | {r['tiles_per_rank']} | "
              f"{r['forward_per_rank_unsplit'] / t:.2f} | {r['forward_per_rank_split'] / t:.2f} | "
              f"{r['forward_backward_per_rank_unsplit'] / t:.2f} | {r['forward_backward_per_rank_split'] / t:.2f} | "
              f"{r['forward_per_rank_split'] / r['forward_per_rank_unsplit']:.3f} |")
    for name in TOWERS:
        r = next(x for x in rows if x["tower"] == name)
        counted = r["forward_per_rank_unsplit"] / r["tiles"]
        print(f"{name}: counted forward per tile {counted / 1e9:.1f} GFLOP, cost model "
              f"{r['cost_model_forward_per_tile'] / 1e9:.1f} GFLOP")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
