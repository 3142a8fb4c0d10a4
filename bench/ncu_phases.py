#!/usr/bin/env python3
"""Per-phase breakdown of one training step from an Nsight Compute kernel trace.

The trace is what scripts/gpu-suite's `phases` step records:

    ncu --clock-control none --cache-control none --csv --page raw --print-units base \
        --metrics gpu__time_duration.sum --log-file ncu.csv \
        .gpu/engine_smoke llama-3-8b 2 2048 1 0

(one optimizer step, every kernel timed on its own). Kernels are grouped by name into the
phases of a step; the gap between kernels is the step time measured without the profiler
(`--step-ms`, from the same machine) minus the summed kernel time.

    python3 bench/ncu_phases.py ncu.csv --step-ms 281.3 [--markdown out.md]
"""
import argparse
import collections
import csv
import gzip
import io
import re

# cuBLAS (nvjet) kernels with the large 256x128 / 320x128 tiles are the frozen base
# projections and the LM head (7 forward + 7 input-gradient GEMMs per layer, plus the loss
# chunks), written fresh ("bz") or, since the rank-r update of a wide output is written
# first, accumulated onto it ("badd"); every other GEMM in the step is a rank-r LoRA
# product (x A^T, its gradients, and the rank-r updates of the outputs).
BASE_GEMM = re.compile(r"^nvjet_sm90_tst_(256x128|320x128)_")
PHASES = [
    ("GEMMs: frozen base projections + LM head", lambda n: bool(BASE_GEMM.match(n))),
    ("GEMMs: LoRA (rank-16 products, split-K reduces)",
     lambda n: n.startswith("nvjet") or "splitKreduce" in n or "gemm" in n.lower()),
    ("LoRA A/B casts f32 -> bf16", lambda n: n.startswith("cast_")),
    ("LoRA hi/lo splits and folds (fp32-accurate adapter path)", lambda n: n.startswith("lora_")),
    ("attention (forward, backward, delta, dq convert)", lambda n: n.startswith("attn_")),
    ("SwiGLU", lambda n: n.startswith("gated_")),
    ("RMSNorm", lambda n: n.startswith("rms_norm")),
    ("RoPE", lambda n: n.startswith("rope")),
    ("cross-entropy (inside the fused LM head + loss)", lambda n: n.startswith(("cross_entropy", "ce_"))),
    ("residual / gradient adds", lambda n: n.startswith("add_")),
    ("embedding", lambda n: n.startswith("embedding")),
    ("optimizer (grad norm + AdamW)", lambda n: n.startswith("adamw")),
]


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
    head, data = rows[0], rows[2:]  # rows[1] holds the units
    name, dur = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    return [(r[name], float(r[dur].replace(",", ""))) for r in data]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--step-ms", type=float, required=True,
                    help="the step's time without the profiler (CUDA events)")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    kernels = load(a.trace)
    ms = collections.Counter()
    calls = collections.Counter()
    for n, ns in kernels:
        phase = next((p for p, match in PHASES if match(n)), "other: " + n[:40])
        ms[phase] += ns / 1e6
        calls[phase] += 1
    total = sum(ms.values())
    out = ["| phase | kernels | ms | share of step |", "|---|---:|---:|---:|"]
    for p, _ in PHASES + [(k, None) for k in ms if k.startswith("other")]:
        if ms[p]:
            out.append(f"| {p} | {calls[p]} | {ms[p]:.1f} | {100 * ms[p] / a.step_ms:.1f}% |")
    gap = a.step_ms - total
    out.append(f"| gaps between kernels (step {a.step_ms:.1f} ms - kernels {total:.1f} ms) | | "
               f"{gap:.1f} | {100 * gap / a.step_ms:.1f}% |")
    text = "\n".join(out)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
