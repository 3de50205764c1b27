#!/usr/bin/env bash
# Build .whl/: the wheels a bare GPU machine lacks, for its Python 3.12 x86-64.
# Run here (a machine with the package index), in the repo root; then copy `.whl` to the GPU machine with the repo and
# run tools/gpu_bench.sh there. .whl/ is git-ignored. Re-running replaces its contents.
#
#   bash tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.whl
rm -rf "$OUT" && mkdir -p "$OUT"

# Pure-Python or cp312 manylinux wheels; versions as in pyproject.toml / constraints.txt.
BINARY=(
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 transformers==5.23.0
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$OUT" "${BINARY[@]}"
# DeepSpeed is a source package: a pure-Python wheel; its CUDA ops compile on the GPU machine at first use.
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8 ||
  "$PY" -m pip wheel --quiet --no-deps -w "$OUT" deepspeed==0.19.8
ls -l "$OUT"
du -sh "$OUT"
