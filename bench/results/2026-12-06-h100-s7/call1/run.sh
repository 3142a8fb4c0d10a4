#!/usr/bin/env bash
# Session 7, GPU call 1: full gpu-check of the split-kernel spread, 8B A/B, GEMM bench cublas vs lt-tuned.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
B=.gpu/tigon; A=.gpu/tigon-base; t0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/hf_compare.py --child prepare --shape 8b --work /tmp/hfc > "$OUT/ab/prepare.txt" 2>&1 &
prep=$!
timeout 240 $B gpu-check --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "check rc=$? $((SECONDS-t0)) s; $(tail -n 1 "$OUT/check.txt")"
grep -E "FAIL|ERROR|rror" "$OUT/check.txt" | head -n 8
grep -E "^ *(lora|matmul)" "$OUT/check.txt" | tail -n 12
wait $prep; echo "prepare rc=$? $((SECONDS-t0)) s"
W=/tmp/hfc/8b
for v in base:$A:fp32:cublas new:$B:fp32:cublas new:$B:bf16:cublas new:$B:fp32:lt-tuned base:$A:fp32:cublas new:$B:fp32:cublas new:$B:fp32:lt-tuned; do
  [ $((SECONDS-t0)) -gt 470 ] && { echo "out of time at $v"; break; }
  IFS=: read -r who bin prec gemm <<< "$v"
  j="$OUT/ab/$who-$prec-$gemm-$SECONDS.json"
  TIGON_GEMM=$gemm timeout 60 $bin bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --steps 8 --warmup 3 --lr 0.0001 --weight-decay 0.01 --shape llama-3-8b --lora-precision $prec --json "$j" > "${j%.json}.txt" 2>&1
  echo "$who $prec $gemm rc=$? $(python3 -c "import json;r=json.load(open('$j'));h=r.get('host',{});print(round(r['tok_s']), round(r['peak_gib'],2), round(r['median_step_ms'],1), 'host', round(h.get('median_busy_ms',0),1), round(h.get('median_wait_ms',0),1), h.get('waits_per_step'), [round(x,4) for x in r['losses'][-3:]])" 2>&1 | tail -n 1) $((SECONDS-t0)) s"
done
for g in cublas lt-tuned; do
  [ $((SECONDS-t0)) -gt 540 ] && { echo "no time for gemm bench $g"; break; }
  TIGON_GEMM=$g timeout 50 $B bench kernels --op gemm --json "$OUT/gemm-$g.json" > "$OUT/gemm-$g.txt" 2>&1
  echo "gemm $g rc=$? $((SECONDS-t0)) s"; tail -n 14 "$OUT/gemm-$g.txt"
done
