#!/usr/bin/env bash
# Session 9, call 3 (binary at the commit that added --prompt-tokens): what skipping the
# unlabelled rows saves a whole LoRA training step. hf_compare.py's 1B (and then 8B) model,
# adapter and token batches; `tigon bench train` with the first 1024 tokens of every
# 2048-token row as a prompt (label -100), alternating the loss on every row
# (--loss-all-rows) and on the labelled rows only, twice each; then every token trained.
set -u
OUT=${OUT:-/tmp/out}
B=.gpu/tigon
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
T0=$SECONDS
run() {  # shape tag args...
    local shape=$1 tag=$2; shift 2
    local M=/tmp/hfc/$shape
    $B bench train --model $M/model --batches $M/batches.safetensors --adapter $M/adapter \
        --shape "$shape" --json "$OUT/$shape-$tag.json" "$@" > "$OUT/$shape-$tag.txt" 2>&1
    echo "$shape $tag rc=$? $(head -n 1 "$OUT/$shape-$tag.txt")"
}
for shape in ${SHAPES:-1b 8b}; do
    if [ $((SECONDS - T0)) -gt 120 ]; then echo "skipping $shape: out of time"; break; fi
    start=$SECONDS
    python3 bench/hf_compare.py --child prepare --shape $shape --work /tmp/hfc --steps 8 --warmup 3 \
        --seed 1234 > "$OUT/prepare-$shape.txt" 2>&1
    echo "prepare $shape rc=$? $((SECONDS - start)) s"
    for i in $(seq ${REPS:-2}); do
        run $shape all-rows-$i --prompt-tokens 1024 --loss-all-rows
        run $shape skip-$i --prompt-tokens 1024
    done
    run $shape no-prompt
done
python3 - "$OUT" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(f))
    print(f"{os.path.basename(f):24s} prompt {r.get('prompt_tokens')} all_rows {r.get('loss_all_rows')} "
          f"tok/s {r.get('tok_s', 0):8.0f} step {r.get('median_step_ms', 0):7.2f} ms peak {r.get('peak_gib', 0):.2f} GiB "
          f"losses {[round(x, 5) for x in r.get('losses', [])][:4]}")
PY
