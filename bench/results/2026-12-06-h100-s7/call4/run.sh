#!/usr/bin/env bash
# Session 7, GPU call 4: attention checked after the Docs change, and the 8B no-checkpointing
# pair (Liger, tigon) measured once more in a second run.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$SECONDS
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
timeout 80 .gpu/tigon gpu-check --op attention > "$OUT/check-attention.txt" 2>&1
echo "check attention rc=$? $((SECONDS-t0)) s: $(tail -n 1 "$OUT/check-attention.txt")"; grep -E "FAIL|rror" "$OUT/check-attention.txt" | head -5
python3 bench/hf_compare.py --shapes 8b --systems hf-peft-liger,tigon --checkpointing off --offload-shapes '' \
  --out "$OUT/train8b" --tigon .gpu/tigon --deadline 200 > "$OUT/train8b.txt" 2>&1
echo "train rc=$? $((SECONDS-t0)) s"
grep -E "llama-3-8b +(hf|tigon)" "$OUT/train8b.txt" | head
