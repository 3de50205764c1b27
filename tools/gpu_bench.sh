#!/usr/bin/env bash
# The one device call: on a bare lent GPU machine (one H100/H200, 16 cores, Python 3.12, torch 2.11, no registry),
# install what it lacks, prove the CUDA training path, time our trainer against the peer, and ALWAYS leave a table
# in $OUT/summary.md, all in one command under 9 minutes.
#
# Here, first (a machine with the package index; tools/gpu_wheels.sh has the details):
#   make gpu-wheels                # .whl/: the wheels the image lacks, closure-checked, and .whl/COMMIT
#   make gpu-commit                # after any later commit: rewrite .whl/COMMIT (the device has no .git)
#   .venv/bin/pytest -q tests/bench/test_gpu_bench.py   # the rehearsal: this script end to end in CPU mode
# Then one device call (the `run` tool), `.whl` in carry, timeout_s 600:
#   bash tools/gpu_bench.sh
# What comes back under $OUT (at most 8 files): summary.md (stages, checks, the timing table, versions, commit,
# command), results.json (every stage's figures), logs.tar.gz (every log, config and metrics.jsonl). Copy the
# summary's tables into benchmarks/RESULTS.md; plan vs measured: `.venv/bin/python tools/bench_table.py` on the
# results' train entries.
#
# Stages, in order, each under its own time box (elapsed time is checked first: a stage that cannot fit in what is
# left of BUDGET_S is skipped, and the summary says so; one that runs over its box is stopped):
#   install      (~40 s)  carried wheels installed and checked: versions, requirement closure, DeepSpeed's
#                         accelerator is cuda, NCCL there (python -m pretrain.bench.device_env --installed cuda)
#   correctness  (~90 s)  python -m pretrain.bench.device_check: packed vs alone losses and gradients per attention
#                         implementation (bf16, train mode, activation checkpointing), no flex recompile after the
#                         first batch at one width (TORCH_LOGS=recompiles in the log), every collective on NCCL at
#                         world size 1, checkpoint save -> resume to the same loss, the 8192^3 bf16 matmul ceiling
#   shards                bench shards (photo-like JPEGs) for the recipes
#   mid, small            `pretrain bench train --peer`, 5 warm-up + 15 measured steps, loader workers for the
#                         machine's cores; ours is recorded before the peer starts; per-trainer timeouts fit the box
#   qlora        (~60 s)  tools/gpu_qlora_smoke.py: a few NF4 QLoRA steps, finite losses, the adapter exported
#                         (only where the image has bitsandbytes; last, so it never takes the timing's time)
# Another stage goes into STAGES below plus a function `stage_NAME` (and its box in BOX); its JSON joins
# results.json when written as $WORK/<stage>.json. `data` and `large` are not in this call: bench data runs on the CPU box, large
# (CPU Adam, ~108 GB of host state) is a second call only if device time is left.
#
# No `set -e`: a failing stage is reported and the next one runs. An EXIT/INT/TERM trap kills every process group
# the script started (each stage runs in its own session; torchrun jobs in theirs are recorded by pretrain bench
# in $WORK/pgids) and writes the summary whatever happened.
#
# CPU mode (the rehearsal, GPU_BENCH_MODE=cpu): the same stages on this machine, with gloo, fp32 and tiny recipes
# (GPU_BENCH_MID / GPU_BENCH_SMALL name configs, GPU_BENCH_OVERRIDES adds overrides); install checks this
# environment instead of installing.

# -- the stages: each runs in a child bash that sources this file with --functions (it then defines these and
# returns), with the settings below exported; $WORK/<stage>.json is a stage's result for the summary. ----------
stage_install() {
  if [[ $MODE = gpu ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
      return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  "$PY" -m pretrain.bench.device_env --installed "$([[ $MODE = gpu ]] && echo cuda || echo cpu)" \
    --out "$WORK/install.json"
}

stage_correctness() {
  TORCH_LOGS=recompiles "$PY" -m pretrain.bench.device_check --out "$WORK/correctness.json"
}

stage_shards() {
  [[ $MODE = gpu ]] || return 0  # the CPU recipes name their own shards
  "$PY" -m pretrain bench shards --out benchdata/train --shards 4 --samples-per-shard 250 --workers "$(nproc)"
}

# bench RECIPE CONFIG: ours then the peer. Ours is on disk before the peer starts; each trainer's own timeout is the
# stage's box, a backstop: the box stops the stage (pretrain bench stops its torchrun job on the SIGTERM, the trap
# kills the job's recorded group in any case).
bench() {
  # shellcheck disable=SC2086
  "$PY" -m pretrain bench train --config "$2" $OVERRIDES --steps "$STEPS" --warmup-steps "$WARMUP" --peer \
    --timeout "$STAGE_BOX" --work-dir "$WORK/bench/$1" --json
}
stage_mid() { bench mid "$MID"; }
stage_small() { bench small "$SMALL"; }

# QLoRA (NF4 base, LoRA adapters; tools/gpu_qlora_smoke.py): bitsandbytes' wheel (~70 MB, CUDA kernels inside) does
# not fit the 64 MiB carry beside the others, so the stage runs where the image has it and says so where it has not.
# CPU mode runs the same path without quantization.
stage_qlora() {
  local quantize=nf4
  if [[ $MODE = gpu ]] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    echo "bitsandbytes not on the device image: QLoRA not checked" > "$WORK/qlora.note"; return 0
  fi
  [[ $MODE = gpu ]] || quantize=none
  "$PY" tools/gpu_qlora_smoke.py "$WORK/qlora" --steps 4 --quantize "$quantize" &&
    cp "$WORK/qlora/qlora_smoke.json" "$WORK/qlora.json"
}

if [[ ${1:-} = --functions ]]; then return 0; fi

# -- the call ----------------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.." || exit 2
MODE=${GPU_BENCH_MODE:-gpu}
OUT=${OUT:-runs/gpu_bench/out}
WORK=${WORK:-runs/gpu_bench/work}
BUDGET_S=${BUDGET_S:-530}  # the whole call, summary included: under 9 minutes
PY=${PY:-python3}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
STAGES=${STAGES:-install correctness shards mid small qlora}
declare -A BOX=([install]=90 [correctness]=150 [shards]=60 [mid]=300 [small]=240 [qlora]=90)
for kv in ${GPU_BENCH_BOXES:-}; do BOX[${kv%%=*}]=${kv#*=}; done  # e.g. "mid=200 small=120"
RESERVE_S=15  # kept back for the trap's summary and tarball
MID=${GPU_BENCH_MID:-configs/bench/mid.yaml}
SMALL=${GPU_BENCH_SMALL:-configs/bench/small.yaml}
OVERRIDES=${GPU_BENCH_OVERRIDES:-"data.num_workers=auto"}
START=$SECONDS
COMMAND="bash tools/gpu_bench.sh${*:+ $*}"
mkdir -p "$OUT" "$WORK/logs"
: > "$WORK/pgids"
: > "$WORK/stages.tsv"
export PRETRAIN_BENCH_PGIDS=$PWD/$WORK/pgids
[[ $WORK = /* ]] && export PRETRAIN_BENCH_PGIDS=$WORK/pgids
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRETRAIN_COMMIT=$(cat .whl/COMMIT 2>/dev/null || echo "unknown (no .whl/COMMIT: run make gpu-commit)")
LOG=$WORK/logs/gpu_bench.log

say() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - START))s $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - RESERVE_S - (SECONDS - START))); }

cleanup() {
  trap - EXIT INT TERM
  local pgid
  for pgid in $(sort -u "$WORK/pgids"); do kill -TERM -- "-$pgid" 2>/dev/null; done
  sleep 1
  for pgid in $(sort -u "$WORK/pgids"); do kill -KILL -- "-$pgid" 2>/dev/null; done
  local wait
  for wait in 1 2 3 4 5 6 7 8 9 10; do  # until they are gone (the GPU's memory with them), 5 s at most
    for pgid in $(sort -u "$WORK/pgids"); do
      pgrep -g "$pgid" -r R,S,D,T > /dev/null && { sleep 0.5; continue 2; }
    done
    break
  done
  say "done: summary in $OUT/summary.md"
  # The summary first in plain shell (it stands if Python cannot run), then the full one over it.
  { echo "# gpu_bench: $MODE mode, commit $PRETRAIN_COMMIT"; echo; echo "| stage | status | seconds | note |";
    echo "|---|---|---|---|"; awk -F'\t' '{print "| " $1 " | " $2 " | " $3 " | " $4 " |"}' "$WORK/stages.tsv"; } \
    > "$OUT/summary.md"
  "$PY" tools/gpu_bench_summary.py "$WORK" "$OUT" >> "$LOG" 2>&1 || say "summary tool failed"
  find "$WORK" -name '*.yaml' -o -name '*.jsonl' -o -name '*.log' -o -name '*.json' -o -name '*.tsv' |
    grep -v '/checkpoints/' | tar -czf "$OUT/logs.tar.gz" -T - 2>/dev/null
  exit 0
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# run_stage NAME: the stage's function in its own session (a process group the trap can kill), under a timeout
# of min(its box, what is left); its output in logs/NAME.log, one line in stages.tsv.
run_stage() {
  local name=$1 box=${BOX[$1]:-120} budget status
  budget=$(left)
  if ((budget < 20)); then
    printf '%s\tskipped\t0\tno time left (%s s)\n' "$name" "$budget" >> "$WORK/stages.tsv"
    say "$name: skipped, $budget s left"; return
  fi
  ((box > budget)) && box=$budget
  say "$name: box $box s ($budget s left)"
  local t0=$SECONDS
  STAGE_BOX=$box setsid timeout -k 5 "$box" bash -c "source tools/gpu_bench.sh --functions; stage_$name" \
    >> "$WORK/logs/$name.log" 2>&1 &
  echo $! >> "$WORK/pgids"
  wait $!
  status=$?
  local note=""
  case $status in
    0) note="ok" ;;
    124|137) note="stopped at its box of $box s" ;;
    *) note="exit $status" ;;
  esac
  [[ -f $WORK/$name.note ]] && note="$note; $(cat "$WORK/$name.note")"
  printf '%s\t%s\t%s\t%s\n' "$name" "$([[ $status = 0 ]] && echo ok || echo FAILED)" $((SECONDS - t0)) "$note" \
    >> "$WORK/stages.tsv"
  say "$name: $note ($((SECONDS - t0)) s)"
}

if [[ $MODE = gpu ]]; then
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MODE WORK OUT PY STEPS WARMUP MID SMALL OVERRIDES COMMAND
say "gpu_bench ($MODE mode): stages $STAGES; budget $BUDGET_S s; commit $PRETRAIN_COMMIT"
for stage in $STAGES; do
  run_stage "$stage"
done
