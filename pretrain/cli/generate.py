"""`pretrain generate HF_DIR --image PATH [--prompt TEXT]`: caption or answer with an exported model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="caption an image (or answer --prompt) with an exported model")
    p.add_argument("hf_dir", help="a directory written by `pretrain convert` (or any Llava model directory)")
    p.add_argument("--image", required=True, action="append", help="image path (repeat for several)")
    p.add_argument("--prompt", default=None, help="a question; without it the model captions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from pretrain.export.generate import Captioner

    missing = [p for p in [args.hf_dir, *args.image] if not Path(p).exists()]
    if missing:
        print(f"error: no such file or directory: {', '.join(missing)}")
        return 1
    captioner = Captioner(args.hf_dir)
    images = [Image.open(p) for p in args.image]
    for path, text in zip(args.image, captioner(images, args.prompt, args.max_new_tokens), strict=True):
        print(f"{path}\t{text}")
    return 0
