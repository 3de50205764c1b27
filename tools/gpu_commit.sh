#!/usr/bin/env bash
# Write .whl/COMMIT: the commit a device run of tools/gpu_bench.sh measures (`git rev-parse HEAD`, `+changes` when
# the tracked files differ from it). The device gets no .git, so the bench reads this file. Run before every call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- || commit="$commit+changes"
echo "$commit" > .whl/COMMIT
echo "commit $commit -> .whl/COMMIT"
