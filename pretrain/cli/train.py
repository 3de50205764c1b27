"""`pretrain train CONFIG [key=value ...]`: one training process (alone, or under launch / torchrun / srun)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

log = logging.getLogger("pretrain.train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one training process")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pretrain import distributed, exit_codes
    from pretrain.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)  # a ConfigError is reported by pretrain.cli.main
    try:
        from pretrain.train.trainer import Trainer

        code = Trainer(cfg).fit()
    except ConfigError as err:
        print(f"pretrain train: {err}", file=sys.stderr, flush=True)
        distributed.finish(exit_codes.EXIT_CONFIG, synchronize=False)
    except Exception as err:
        # A failing rank must not leave its peers waiting in a collective: exit now without a barrier; the
        # launcher (torchrun / srun --kill-on-bad-exit) then ends the others.
        traceback.print_exc()
        print(f"error: training stopped: {err}", flush=True)
        distributed.finish(exit_codes.EXIT_ERROR, synchronize=False)
    distributed.finish(code)
    return code  # not reached: finish() exits
