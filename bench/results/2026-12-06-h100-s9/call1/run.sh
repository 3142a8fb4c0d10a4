#!/usr/bin/env bash
# Session 9, call 1: the new row copy (index_rows) and fused linear cross-entropy with
# skip_ignored against their CPU references, the op's benchmark (prompt-like labels with and
# without skipping), and tigon parity against HF+PEFT on the GPU (its batches have ignored
# labels, so the engine's skipping loss runs with gathered chunks).
set -u
OUT=${OUT:-/tmp/out}
B=.gpu/tigon
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
start=$SECONDS
$B gpu-check --op index_rows,fused_linear_cross_entropy --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "gpu-check rc=$? $((SECONDS - start)) s"
start=$SECONDS
$B bench kernels --op fused_linear_cross_entropy --runs 20 --json "$OUT/flce.json" > "$OUT/flce.txt" 2>&1
echo "bench rc=$? $((SECONDS - start)) s"
start=$SECONDS
OUT="$OUT/parity-run" scripts/gpu-suite parity > "$OUT/parity-suite.txt" 2>&1
echo "parity suite rc=$? $((SECONDS - start)) s"
grep -cE "PASS" "$OUT/check.txt"; grep -E "FAIL|error|Error" "$OUT/check.txt" | head -20
tail -n 12 "$OUT/parity-suite.txt"
head -n 9 "$OUT/flce.txt"; grep prompts "$OUT/flce.txt"
