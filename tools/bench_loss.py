"""Memory and time of the LM-head loss: the earlier per-chunk head calls vs the fused, chunked head +
cross-entropy, as a markdown table (the measurements are pretrain.bench.loss).

    python tools/bench_loss.py [--vocab 50000 --rows 8192 --hidden 128 --chunk 4096]
"""

from __future__ import annotations

import argparse

import torch

from pretrain.bench.loss import fused, loss_memory, per_chunk_head_calls, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--rows", type=int, default=8192, help="label rows of the micro-batch")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--chunk", type=int, default=4096)
    args = p.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden, targets = torch.randn(args.rows, args.hidden), torch.randint(0, args.vocab, (args.rows,))
    mib = 2**20
    print(f"vocab {args.vocab}, {args.rows} label rows, hidden {args.hidden}, chunk {args.chunk}, fp32")
    print("| loss | saved for backward | largest tensor | forward + backward |\n| --- | --- | --- | --- |")
    for name, fn in (("per-chunk head calls (before)", per_chunk_head_calls), ("fused chunked (after)", fused)):
        m = loss_memory(fn, head, hidden, targets, args.chunk)
        s = seconds(fn, head, hidden, targets, args.chunk)
        print(f"| {name} | {m['saved'] / mib:.1f} MiB | {m['largest'] / mib:.1f} MiB | {s:.2f} s |")


if __name__ == "__main__":
    main()
