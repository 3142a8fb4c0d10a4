#!/usr/bin/env bash
# Session 6, GPU call 4: every kernel of one 8B training step timed by Nsight Compute, with
# the default fp32-accurate adapter path and with --lora-precision bf16 (bench/ncu_phases.py
# groups them into phases).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=.gpu/tigon; t0=$SECONDS
command -v ncu || { echo "no ncu"; exit 1; }
python3 bench/hf_compare.py --child prepare --shape 8b --work /tmp/hfc > "$OUT/prepare.txt" 2>&1
echo "prepare rc=$? $((SECONDS-t0)) s"
W=/tmp/hfc/8b
for prec in fp32 bf16; do
  [ $((SECONDS-t0)) -gt 200 ] && { echo "out of time at $prec"; break; }
  timeout 110 ncu --clock-control none --cache-control none --csv --page raw --print-units base \
    --metrics gpu__time_duration.sum --log-file "$OUT/ncu-8b-$prec.csv" \
    $B bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --steps 1 --warmup 0 --shape llama-3-8b --lora-precision $prec > "$OUT/ncu-$prec.txt" 2>&1
  echo "ncu $prec rc=$? $((SECONDS-t0)) s $(wc -l < "$OUT/ncu-8b-$prec.csv")"
  gzip -f "$OUT/ncu-8b-$prec.csv"
done
