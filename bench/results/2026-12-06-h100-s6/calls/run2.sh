#!/usr/bin/env bash
# Session 6, GPU call 2: checks of the changed LoRA ops, the grouped bench, the train suite
# (1b, 8b: HF+PEFT, +Liger, tigon), then an A/B of the 8B step on the suite's model
# (old = 3841040, new = this tree; fp32 and bf16 adapter paths) while time is left.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
B=.gpu/tigon; O=.gpu/tigon-old
t0=$SECONDS
$B gpu-check --op lora_split,lora_group_split,lora_group,lora_linear --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "check rc=$? $((SECONDS-t0)) s; $(tail -n 1 "$OUT/check.txt")"
grep -E "FAIL|ERROR" "$OUT/check.txt" | head -n 10
$B bench kernels --op lora_group_split,lora_group --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench rc=$? $((SECONDS-t0)) s"; grep -E "^lora_group" "$OUT/bench.txt"
bash scripts/gpu-suite train SHAPES=1b,8b > "$OUT/suite.txt" 2>&1
echo "suite rc=$? $((SECONDS-t0)) s"; grep -E "^llama|rc=|in all" "$OUT/suite.txt"
W=/tmp/hfc/8b
for v in old:$O:fp32 new:$B:fp32 new:$B:bf16 old:$O:fp32 new:$B:fp32; do
  [ $((SECONDS-t0)) -gt 555 ] && { echo "out of time at $v"; break; }
  IFS=: read -r name bin prec <<< "$v"
  j="$OUT/ab/$name-$prec-$SECONDS.json"
  timeout 40 $bin bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --steps 8 --warmup 3 --lr 0.0001 --weight-decay 0.01 --shape llama-3-8b \
    --lora-precision $prec --json "$j" > "${j%.json}.txt" 2>&1
  echo "$name $prec rc=$? $(python3 -c "import json;r=json.load(open('$j'));print(round(r['tok_s']), round(r['peak_gib'],2))" 2>&1 | tail -n 1) $((SECONDS-t0)) s"
done
