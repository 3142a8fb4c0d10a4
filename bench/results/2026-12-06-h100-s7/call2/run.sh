#!/usr/bin/env bash
# Session 7, GPU call 2: the ops call 1's check did not reach, the 8B step's host time by kind of
# call, and (if gdb is there) stack samples of the host thread during 8B steps.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
B=.gpu/tigon; t0=$SECONDS
which gdb perf eu-stack 2>&1 | head -3
python3 bench/hf_compare.py --child prepare --shape 8b --work /tmp/hfc > "$OUT/ab/prepare.txt" 2>&1 &
prep=$!
timeout 200 $B gpu-check --op lora_split,lora_group_split,lora_group,lora_linear,attention,adamw,dropout,lora_merge,matmul_lt --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
echo "check rc=$? $((SECONDS-t0)) s; $(tail -n 1 "$OUT/check.txt")"
grep -E "FAIL|ERROR|rror|took" "$OUT/check.txt" | head -n 20
wait $prep; echo "prepare rc=$? $((SECONDS-t0)) s"
W=/tmp/hfc/8b
run() { timeout 90 $B bench train --model $W/model --batches $W/batches.safetensors --adapter $W/adapter \
    --warmup 3 --lr 0.0001 --weight-decay 0.01 --shape llama-3-8b "$@"; }
for prec in fp32 bf16; do
  j="$OUT/ab/host-$prec.json"
  run --steps 6 --lora-precision $prec --json "$j" > "${j%.json}.txt" 2>&1
  echo "$prec rc=$? $((SECONDS-t0)) s"
  python3 -c "
import json; r=json.load(open('$j')); h=r['host']
print(round(r['tok_s']), 'tok/s step', round(r['median_step_ms'],1), 'ms; host busy', round(h['median_busy_ms'],1), 'wait', round(h['median_wait_ms'],1), 'waits', h['waits_per_step'])
for k,v in h['calls_per_step'].items(): print(f'  {k:12s} {v[\"calls\"]:8.0f} calls {v[\"ms\"]:8.2f} ms {1000*v[\"ms\"]/max(v[\"calls\"],1):7.2f} us/call')
"
done
if which gdb >/dev/null 2>&1 && [ $((SECONDS-t0)) -lt 420 ]; then
  run --steps 40 --lora-precision fp32 --json "$OUT/ab/gdb-run.json" > "$OUT/ab/gdb-run.txt" 2>&1 &
  pid=$!
  sleep 40
  tp=$(pgrep -f "tigon bench train" | head -1)
  for i in $(seq 40); do
    timeout 10 gdb -batch -p $tp -ex "thread apply all bt 30" > "$OUT/stack-$i.txt" 2>&1
    sleep 0.3
  done
  kill $pid 2>/dev/null
  python3 - "$OUT" <<'PY'
import collections, glob, re, sys
top = collections.Counter(); frames = collections.Counter()
n = 0
for f in glob.glob(sys.argv[1] + "/stack-*.txt"):
    txt = open(f).read()
    # the main thread is "Thread 1"
    m = re.search(r"Thread 1 .*?\n((?:#.*\n)+)", txt)
    if not m: continue
    n += 1
    lines = [l for l in m.group(1).splitlines() if l.startswith("#")]
    names = []
    for l in lines:
        mm = re.search(r" in (\S+)", l) or re.search(r"#\d+\s+(\S+)", l)
        names.append(mm.group(1) if mm else l[:60])
    top[" < ".join(names[:4])] += 1
    for x in set(names): frames[x] += 1
print(f"{n} samples of thread 1")
for k, v in top.most_common(12): print(f"{v:3d}  {k[:200]}")
print("-- frames anywhere on the stack")
for k, v in frames.most_common(40): print(f"{v:3d}  {k[:150]}")
PY
fi
