"""`pretrain generate HF_DIR --image PATH [--image PATH ...] [--prompt TEXT]`: caption or answer with an exported
model: each image on its own, or all of them in one turn with --together. `--video PATH`: answer about a clip with
an exported video model. On the GPU in bf16 when there is one."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="caption an image (or answer --prompt) with an exported model")
    p.add_argument("hf_dir", help="a directory written by `pretrain convert` (or any Llava model directory)")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--video", default=None, help="a clip to answer about (an exported video model)")
    p.add_argument("--prompt", default=None, help="a question; without it the model captions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--together", action="store_true",
                   help="all images in one user turn, one answer (the prompt's <image> markers place them)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")
    p.set_defaults(handler=run)


def not_an_export(path: str) -> str | None:
    """One line naming what `path` is and what to run, when it is not an exported model directory."""
    from pathlib import Path

    d = Path(path)
    if (d / "config.json").is_file() or (d / "adapter_config.json").is_file():  # an export, or a LoRA adapter
        return None
    if (d / "checkpoints").is_dir() or (d / "COMMITTED").is_file() or (d / "latest").is_file():
        what = "a training run directory" if (d / "checkpoints").is_dir() else "a checkpoint"
        return (f"{path} is {what}, not an exported model: run `pretrain convert {path} OUT_DIR`, then "
                f"`pretrain generate OUT_DIR --image ...`")
    return f"{path} is not an exported model (no config.json): give a `pretrain convert` output directory"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if bool(args.image) == bool(args.video):
        print("pretrain generate: give --image (one or more) or --video")
        return 2
    missing = [p for p in [args.hf_dir, *args.image, *([args.video] if args.video else [])] if not Path(p).exists()]
    if missing:
        print(f"error: no such file or directory: {', '.join(missing)}")
        return 1
    problem = not_an_export(args.hf_dir)
    if problem:
        print(f"pretrain generate: {problem}")
        return 2
    from pretrain.export.inference import Captioner, load_image, resolve_device, user_content

    try:
        if args.prompt is not None:  # <image> markers that do not match the images: say so before loading
            user_content(len(args.image) if args.together else 1, args.prompt)
        device, dtype = resolve_device(args.device, args.dtype)
    except (ValueError, RuntimeError) as err:
        print(f"pretrain generate: {err}")
        return 2
    if args.video:
        return _answer_clip(args, dtype, device)
    captioner = Captioner(args.hf_dir, dtype=dtype, device=device)
    images = [load_image(p) for p in args.image]
    try:
        if args.together:
            print(f"{','.join(args.image)}\t{captioner.together(images, args.prompt, args.max_new_tokens)}")
            return 0
        for path, text in zip(args.image, captioner(images, args.prompt, args.max_new_tokens), strict=True):
            print(f"{path}\t{text}")
    except ValueError as err:  # e.g. a prompt for an export without a chat template
        print(f"pretrain generate: {err}")
        return 2
    return 0


def _answer_clip(args: argparse.Namespace, dtype, device) -> int:
    from pathlib import Path

    from pretrain.data.errors import SampleError
    from pretrain.export.video_inference import ClipAnswerer

    try:
        answerer = ClipAnswerer(args.hf_dir, dtype=dtype, device=device)
        text = answerer(Path(args.video).read_bytes(), args.prompt or "Describe the video.", args.max_new_tokens)
    except (ValueError, SampleError) as err:
        print(f"pretrain generate: {err}")
        return 2
    print(f"{args.video}\t{text}")
    return 0
