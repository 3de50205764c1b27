"""Plan vs measured for the bench recipes, as a markdown table (the rows are pretrain.bench.plan_table).

    python tools/bench_table.py RESULT.json [RESULT.json ...]

Each RESULT.json is the last line of `pretrain bench train --config configs/bench/NAME.yaml --json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.bench.plan_table import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="JSON files: the last line of `pretrain bench train --json`")
    args = parser.parse_args()
    print(table([json.loads(Path(p).read_text().strip().splitlines()[-1]) for p in args.results]))


if __name__ == "__main__":
    main()
