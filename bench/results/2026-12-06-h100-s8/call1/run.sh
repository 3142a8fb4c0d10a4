#!/usr/bin/env bash
# Session 8, GPU call 1: where the fused linear CE's time goes at 768-token chunks.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; B=.gpu/tigon; t0=$SECONDS
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active --format=csv -lms 50 > "$OUT/smi.csv" 2>&1 &
SMI=$!
$B bench kernels --op fused_linear_cross_entropy --json "$OUT/flce.json" > "$OUT/flce.txt" 2>&1
echo "flce rc=$? $((SECONDS-t0)) s"
echo "--- ws64" >> "$OUT/smi.csv"
CUBLAS_WORKSPACE_CONFIG=:65536:2 $B bench kernels --op fused_linear_cross_entropy --json "$OUT/flce-ws64.json" > "$OUT/flce-ws64.txt" 2>&1
echo "ws64 rc=$? $((SECONDS-t0)) s"
kill $SMI
cat "$OUT/flce.txt"; echo; grep -E "c768|fused " "$OUT/flce-ws64.txt"
