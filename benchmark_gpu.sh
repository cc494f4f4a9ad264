#!/usr/bin/env bash
# The GPU measurements of the README in one go (about 8 minutes on one H200):
# DeiT-Ti / S / B at 224 and B at 384, inference and training in bf16 against timm's reference;
# the data pipeline with 16 workers; DeiT-S distilled with its RegNetY-16GF teacher (fused AdamW and
# channels_last measured); DeiT-S under torch.compile.
#
# Each run has its own time limit, the whole script BUDGET seconds (a run that would start past it
# is skipped), and each run rewrites its JSON after every part, so a cut run keeps what it measured.
# Results: $OUT/<run>.json and $OUT/log.txt (OUT defaults to ./benchmark_results).
#
#   bash benchmark_gpu.sh
#   OUT=/tmp/bench BUDGET=300 PYTHON=python bash benchmark_gpu.sh
set -u
cd "$(dirname "$0")"
OUT=${OUT:-benchmark_results}
BUDGET=${BUDGET:-540}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)
failed=0

run() {  # run NAME SECONDS ARGS...: one benchmark.py process, limited to SECONDS and to what is left
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - start)))
  if ((left < 30)); then
    echo "=== $name skipped: the ${BUDGET}s budget is spent" | tee -a "$OUT/log.txt"
    failed=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (at most ${limit}s): benchmark.py $*" | tee -a "$OUT/log.txt"
  local log
  log=$(mktemp)
  timeout -k 10 "$limit" "$PYTHON" benchmark.py --json "$OUT/$name.json" "$@" >"$log" 2>&1
  local rc=$?
  ((rc != 0)) && failed=1 && echo "=== $name exited with $rc" >>"$log"
  cat "$log" >>"$OUT/log.txt"
  tail -n 14 "$log"
  rm -f "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; } >>"$OUT/log.txt" 2>&1
gpu="--device cuda --precision bf16 --repeats 5 --min-time 0.3"
run tiny 70 --model deit_tiny_patch16_224 $gpu --skip-options --skip-data --skip-epoch
run small 70 --model deit_small_patch16_224 $gpu --skip-options --skip-data --skip-epoch
run base 80 --model deit_base_patch16_224 $gpu --skip-options --skip-data --skip-epoch
run base384 90 --model deit_base_patch16_384 $gpu --skip-options --skip-data --skip-epoch
run data 60 --model deit_small_patch16_224 $gpu --workers 16 --data-images 512 \
  --skip-flops --skip-inference --skip-train --skip-options --skip-epoch
run teacher 90 --model deit_small_distilled_patch16_224 --teacher-model regnety_160 $gpu \
  --skip-inference --skip-data --skip-epoch
run compile 150 --model deit_small_patch16_224 --compile --skip-timm $gpu --skip-data --skip-epoch
echo "=== done in $(($(date +%s) - start))s" | tee -a "$OUT/log.txt"
exit $failed
