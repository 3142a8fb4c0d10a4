#!/usr/bin/env bash
# Session 8, GPU call 3: the refactored loop benches, a third run of the fused linear CE.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; B=.gpu/tigon; t0=$SECONDS
timeout 100 $B bench kernels --op fused_linear_cross_entropy --runs 20 --json "$OUT/flce.json" > "$OUT/flce.txt" 2>&1
echo "flce rc=$? $((SECONDS-t0)) s"
grep -E "  (fused|c768|c1024) |loop (logits|ce|dh|all)|loop-algo all" "$OUT/flce.txt"
