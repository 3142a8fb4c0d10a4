#!/usr/bin/env bash
# Session 8, GPU call 2: the chunk GEMMs' cuBLASLt algorithms timed in the power-limited loop,
# the op with tune_gemms, and gpu-check of fused_linear_cross_entropy (incl. a tuned case).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; B=.gpu/tigon; t0=$SECONDS
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv -lms 100 > "$OUT/smi.csv" 2>&1 &
SMI=$!
$B bench kernels --op fused_linear_cross_entropy --runs 20 --json "$OUT/flce.json" > "$OUT/flce.txt" 2>&1
echo "flce rc=$? $((SECONDS-t0)) s"
kill $SMI
if [ $((SECONDS-t0)) -lt 150 ]; then
  timeout 150 $B gpu-check --op fused_linear_cross_entropy > "$OUT/check.txt" 2>&1
  echo "check rc=$? $((SECONDS-t0)) s: $(tail -n 1 "$OUT/check.txt")"; grep -E "FAIL|ERROR|tuned" "$OUT/check.txt" | head
fi
grep -E "  (fused|c768|c768 tuned) |loop" "$OUT/flce.txt"
