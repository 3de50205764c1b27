"""The `pretrain` command: a thin layer of argparse over the library. Each sub-command lives in its own module
with `register(subparsers)`; handlers return the process exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Sub-command modules, in the order `pretrain --help` lists them.
COMMANDS = ("train", "launch", "submit", "demo", "shards", "verify", "convert", "generate", "eval", "bench", "plan",
            "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain LLaVA-style vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pretrain.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow the flags (`launch CONFIG --nproc 2 train.lr=1e-4`); argparse stops
    # collecting positionals after an option, so gather them here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from pretrain.cli.plugins import activate_plugins
    from pretrain.config import ConfigError  # after parsing: `--help` imports no library code

    try:
        activate_plugins(args.command)
        return int(args.handler(args) or 0)
    except ConfigError as err:
        # One place reports a config that cannot run, for every command: the key, what is valid, exit 2.
        name = " ".join(filter(None, (args.command, getattr(args, "shards_command", None))))
        print(f"pretrain {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
