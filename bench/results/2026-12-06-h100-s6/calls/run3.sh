#!/usr/bin/env bash
# Session 6, GPU call 3: checks of the changed LoRA ops, the grouped benches, an A/B of the
# 8B step (old = 3841040, s6a = the run-2 binary, new = this tree), GPU parity, and (time
# left) an nsys kernel summary of one new fp32 run.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
B=.gpu/tigon; O=.gpu/tigon-old; A=.gpu/tigon-s6a
t0=$SECONDS
$B gpu-check --op lora_split,lora_group_split,lora_group,lora_linear --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "check rc=$? $((SECONDS-t0)) s; $(tail -n 1 "$OUT/check.txt")"
grep -E "FAIL|ERROR" "$OUT/check.txt" | head -n 10
$B bench kernels --op lora_group_split,lora_group --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "bench rc=$? $((SECONDS-t0)) s"; grep -E "^lora_group" "$OUT/bench.txt"
python3 bench/hf_compare.py --shapes 8b --systems tigon --checkpointing off --offload-shapes '' \
    --tigon $B --out "$OUT/hfc" > "$OUT/hfc.txt" 2>&1
echo "hfc rc=$? $((SECONDS-t0)) s"; grep -E "^llama" "$OUT/hfc.txt"
W=/tmp/hfc/8b
for v in old:$O:fp32 s6a:$A:fp32 new:$B:fp32 new:$B:bf16 old:$O:fp32 s6a:$A:fp32 new:$B:fp32; do
  [ $((SECONDS-t0)) -gt 420 ] && { echo "out of time at $v"; break; }
  IFS=: read -r name bin prec <<< "$v"
  j="$OUT/ab/$name-$prec-$SECONDS.json"
  timeout 40 $bin bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --steps 8 --warmup 3 --lr 0.0001 --weight-decay 0.01 --shape llama-3-8b \
    --lora-precision $prec --json "$j" > "${j%.json}.txt" 2>&1
  echo "$name $prec rc=$? $(python3 -c "import json;r=json.load(open('$j'));print(round(r['tok_s']), round(r['peak_gib'],2), [round(x,4) for x in r['losses'][-3:]])" 2>&1 | tail -n 1) $((SECONDS-t0)) s"
done
if [ $((SECONDS-t0)) -lt 450 ]; then
  timeout $((560 - (SECONDS-t0))) bash scripts/gpu-suite parity > "$OUT/parity-suite.txt" 2>&1
  echo "parity rc=$? $((SECONDS-t0)) s"; grep -E "PASS|FAIL|passed" "$OUT/parity-suite.txt" | tail -n 4
fi
if command -v nsys > /dev/null && [ $((SECONDS-t0)) -lt 500 ]; then
  timeout $((585 - (SECONDS-t0))) nsys profile -o "$OUT/nsys-8b" --force-overwrite true \
    $B bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --steps 2 --warmup 1 --shape llama-3-8b > "$OUT/nsys.txt" 2>&1 && \
  timeout $((595 - (SECONDS-t0))) nsys stats --report cuda_gpu_kern_sum --format csv \
    -o "$OUT/nsys-8b" "$OUT/nsys-8b.nsys-rep" >> "$OUT/nsys.txt" 2>&1
  echo "nsys rc=$? $((SECONDS-t0)) s"; rm -f "$OUT/nsys-8b.nsys-rep" "$OUT"/nsys-8b.sqlite
fi
