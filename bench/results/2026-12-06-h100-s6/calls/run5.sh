#!/usr/bin/env bash
# Session 6, GPU call 5: the split-kernel fix checked, and an A/B of the 8B step
# (s6b = run-3/4 binary, new = this tree), fp32 adapter path.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
B=.gpu/tigon; A=.gpu/tigon-s6b; t0=$SECONDS
$B gpu-check --op lora_split,lora_group_split --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "check rc=$? $((SECONDS-t0)) s; $(tail -n 1 "$OUT/check.txt")"; grep -E "FAIL|ERROR" "$OUT/check.txt" | head -n 5
python3 bench/hf_compare.py --child prepare --shape 8b --work /tmp/hfc > "$OUT/prepare.txt" 2>&1
echo "prepare rc=$? $((SECONDS-t0)) s"
W=/tmp/hfc/8b
for v in new:$B s6b:$A new:$B; do
  [ $((SECONDS-t0)) -gt 100 ] && { echo "out of time at $v"; break; }
  IFS=: read -r name bin <<< "$v"
  j="$OUT/ab/$name-$SECONDS.json"
  timeout 30 $bin bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --steps 8 --warmup 3 --lr 0.0001 --weight-decay 0.01 --shape llama-3-8b --json "$j" > "${j%.json}.txt" 2>&1
  echo "$name rc=$? $(python3 -c "import json;r=json.load(open('$j'));print(round(r['tok_s']), round(r['peak_gib'],2), [round(x,4) for x in r['losses'][-3:]])" 2>&1 | tail -n 1) $((SECONDS-t0)) s"
done
