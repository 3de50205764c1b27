#!/usr/bin/env bash
# Build .whl/ for the lent GPU machine (Python 3.12, x86-64, no registry there): the wheels named in
# tools/gpu_wheels.txt (what the image in tools/gpu_image.txt lacks or holds at another version than we pin), checked
# for a complete requirement closure (python -m pretrain.bench.device_env --wheels .whl), and .whl/COMMIT: the commit
# the device run measures (the device has no .git). Run here, in the repo root, with the package index reachable:
#
#   bash tools/gpu_wheels.sh          # or: make gpu-wheels
#
# .whl/ is git-ignored: name it in the device call's `carry`. Re-running replaces the wheels; after a new commit,
# `make gpu-commit` rewrites .whl/COMMIT alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=.whl
mapfile -t WHEELS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' tools/gpu_wheels.txt)
rm -rf "$DIR" && mkdir -p "$DIR"

# DeepSpeed is a source package: a pure-Python wheel; its CUDA ops compile on the GPU machine at first use.
BINARY=()
for spec in "${WHEELS[@]}"; do
  case "$spec" in
    deepspeed==*) "$PY" -m pip wheel --quiet --no-deps -w "$DIR" "$spec" ;;
    *) BINARY+=("$spec") ;;
  esac
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DIR" "${BINARY[@]}"
"$PY" -m pretrain.bench.device_env --wheels "$DIR" > "$DIR/closure.json" || {
  cat "$DIR/closure.json"; echo "gpu_wheels: the wheel set is incomplete (above)" >&2; exit 1; }
bash tools/gpu_commit.sh
ls -l "$DIR"
du -sh "$DIR"
