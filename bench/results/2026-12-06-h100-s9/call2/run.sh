#!/usr/bin/env bash
# Session 9, call 2 (binary b097b4c): the fused linear cross-entropy check with the case
# list split into labels and skip mode (a real every-label-ignored case with skip_ignored),
# the op's benchmark with prompt-like labels from the shared LCG runs, and torch eager and
# Liger-Kernel on the same rows (bench/torch_kernels.py, the _prompts case) in the same call.
set -u
OUT=${OUT:-/tmp/out}
B=.gpu/tigon
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$SECONDS
$B gpu-check --op fused_linear_cross_entropy --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "gpu-check rc=$? $((SECONDS - start)) s"
start=$SECONDS
$B bench kernels --op fused_linear_cross_entropy --runs 20 --json "$OUT/flce.json" > "$OUT/flce.txt" 2>&1
echo "bench rc=$? $((SECONDS - start)) s"
start=$SECONDS
python3 bench/torch_kernels.py --ops fused_linear_cross_entropy,fused_linear_cross_entropy_prompts \
    --out "$OUT/torch.json" > "$OUT/torch.txt" 2>&1
echo "torch rc=$? $((SECONDS - start)) s"
tail -n 1 "$OUT/check.txt"; grep -E "FAIL" "$OUT/check.txt" | head; grep "every label ignored" "$OUT/check.txt"
head -n 9 "$OUT/flce.txt"; grep prompts "$OUT/flce.txt"
tail -n 8 "$OUT/torch.txt"
# The .whl folder was not carried in this run, so Liger was not importable
# (torch-no-liger.txt); on the same warm machine, right after, with `carry: [.gpu, .whl]`:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 bench/torch_kernels.py --ops fused_linear_cross_entropy,fused_linear_cross_entropy_prompts \
#       --out "$OUT/torch.json" > "$OUT/torch.txt"
