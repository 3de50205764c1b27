#!/usr/bin/env bash
# The GPU benchmark run: bench data, bench train on the small/mid/large recipes against the peer (transformers'
# Trainer + DeepSpeed ZeRO-3 + padding collator), and plan vs measured, on a bare machine with one GPU.
#
# Before: `bash tools/gpu_wheels.sh` here (builds .whl/ for the machine's Python 3.12). Then, on the GPU machine,
# with .whl/ copied along, one command per line (each step fits in 10 minutes; a bare machine needs `install`):
#   bash tools/gpu_bench.sh install data small      # wheels, versions, bench data (1 and 8 workers), small recipe
#   bash tools/gpu_bench.sh install mid
#   bash tools/gpu_bench.sh install large           # ours only; PEER_LARGE=1 adds the peer (likely over 10 min)
# Each step appends its table to $OUT/RESULTS.md (date, device, versions, commit, command) and its JSON to
# $OUT/<step>.json; the log is $OUT/gpu_bench.log. Back on the CPU machine, plan vs measured for the recipes run:
#   .venv/bin/python tools/bench_table.py small.json mid.json large.json
# Then copy the entries of RESULTS.md and that table into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
PY=${PY:-python3}
STEPS_SMALL=${STEPS_SMALL:-30}
STEPS_MID=${STEPS_MID:-30}
STEPS_LARGE=${STEPS_LARGE:-8}
PEER_LARGE=${PEER_LARGE:-0}
TIMEOUT=${TIMEOUT:-500}  # per trainer, seconds
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The wheels install outside the repo (the machine's own site-packages may be read-only).
SITE=${SITE:-$HOME/.cache/pretrain-gpu-site}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=$OUT/gpu_bench.log
RESULTS=$OUT/RESULTS.md

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

install() {
  if ! "$PY" -c "import deepspeed, webdataset, pydantic, braceexpand, hjson" 2>/dev/null ||
     [ "$("$PY" -c 'import transformers; print(transformers.__version__)')" != "5.23.0" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, transformers, deepspeed, webdataset, PIL
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| deepspeed", deepspeed.__version__, "| webdataset", webdataset.__version__, "| pillow", PIL.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
try:
    import flash_attn  # noqa: F401
    print("flash-attn available")
except ImportError:
    print("flash-attn not installed: attention runs on SDPA")
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG" || true
}

shards() {  # the bench recipes read benchdata/train/shard-{000000..000003}.tar
  if [ ! -f benchdata/train/shard-000003.tar ]; then
    say "writing bench shards"
    "$PY" -m pretrain bench shards --out benchdata/train --shards 4 --samples-per-shard 250 --workers 8 2>&1 |
      tee -a "$LOG"
  fi
}

last_json() { tail -n 1 "$1" > "$2"; }

data() {
  shards
  for workers in 1 8; do
    say "bench data, $workers worker(s)"
    "$PY" -m pretrain bench data --config configs/bench/large.yaml --workers "$workers" --seconds 8 --rounds 3 \
      --record "$RESULTS" --json 2>&1 | tee -a "$LOG" "$OUT/data.tmp"
    last_json "$OUT/data.tmp" "$OUT/data-$workers.json"
  done
  rm -f "$OUT/data.tmp"
}

train() {  # train RECIPE STEPS [--peer]
  shards
  say "bench train $1 ($2 steps) $3"
  "$PY" -m pretrain bench train --config "configs/bench/$1.yaml" --steps "$2" $3 --timeout "$TIMEOUT" \
    --record "$RESULTS" --json 2>&1 | tee -a "$LOG" "$OUT/$1.tmp"
  last_json "$OUT/$1.tmp" "$OUT/$1.json"
  rm -f "$OUT/$1.tmp"
  "$PY" tools/bench_table.py "$OUT/$1.json" 2>&1 | tee -a "$LOG" "$OUT/table-$1.md"
}

[ $# -gt 0 ] || set -- install data small mid large
for step in "$@"; do
  case "$step" in
    install) install ;;
    data) data ;;
    small) train small "$STEPS_SMALL" --peer ;;
    mid) train mid "$STEPS_MID" --peer ;;
    large) if [ "$PEER_LARGE" = 1 ]; then train large "$STEPS_LARGE" --peer; else train large "$STEPS_LARGE" ""; fi ;;
    *) echo "unknown step $step (valid: install data small mid large)" >&2; exit 2 ;;
  esac
done
say "done: $*"
