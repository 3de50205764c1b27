"""`pretrain report RUN_DIR [--out DIR]`: the run's curves (loss, learning rate, tokens/s, MFU, data wait, skipped
samples over steps, resumes marked) as report.png and report.html."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a PNG and an HTML page of a run's curves, resumes marked",
                       description=__doc__)
    p.add_argument("run_dir", help="a run directory (run.output_dir)")
    p.add_argument("--out", default=None, help="where to write report.png and report.html (default: RUN_DIR)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from pretrain.train.report import write_report

    try:
        png, page = write_report(args.run_dir, args.out)
    except FileNotFoundError as err:
        print(f"pretrain report: {err}", file=sys.stderr)
        return 2
    print(png)
    print(page)
    return 0
