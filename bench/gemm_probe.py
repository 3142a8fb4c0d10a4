#!/usr/bin/env python3
"""cuBLAS through torch at the shapes tigon's GEMMs run, on the GPU machine:

1. the two GEMMs of fused linear cross-entropy (8192 tokens x 4096 -> 128256, bf16) per
   token chunk, through cuBLAS and cuBLASLt: what the GEMMs alone cost at each chunk size
   (the logits chunk is chunk x 128256 x 2 bytes: 256 -> 63 MiB, 1024 -> 250 MiB);
2. at the Llama-3-8B projection shapes (4096 tokens), a base GEMM written fresh (beta 0)
   against accumulated (beta 1), and the rank-16 update written fresh against added onto a
   full output (what ordering the LoRA update before the base GEMM would save).

    python3 bench/gemm_probe.py   # prints a table, writes $OUT/gemm_probe.json
"""
import json, os, sys, torch
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
def t(fn, reps=20, warm=5):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
res = {}
N, H, V = 8192, 4096, 128256
h = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
W = torch.randn(V, H, device=dev, dtype=torch.bfloat16) * 0.02
for lib in ["cublas", "cublaslt"]:
    torch.backends.cuda.preferred_blas_library(lib)
    for chunk in [256, 512, 768, 1024, 2048]:
        lg = torch.empty(chunk, V, device=dev, dtype=torch.bfloat16)
        dh = torch.empty(N, H, device=dev, dtype=torch.bfloat16)
        # The last chunk may be shorter: slice the buffers (an `out=` of the wrong shape
        # would be reallocated by torch inside the timed loop).
        def logits():
            for s in range(0, N, chunk):
                rows = min(chunk, N - s)
                torch.mm(h[s:s+rows], W.t(), out=lg[:rows])
        def dhf():
            for s in range(0, N, chunk):
                rows = min(chunk, N - s)
                torch.mm(lg[:rows], W, out=dh[s:s+rows])
        a, b = t(logits, 5, 2), t(dhf, 5, 2)
        fl = 2 * N * H * V
        res[f"{lib} c{chunk}"] = (a, b)
        print(f"{lib:9s} chunk {chunk:5d}: logits {a:7.2f} ms ({fl/a/1e9:5.0f} TF/s)  dh {b:7.2f} ms ({fl/b/1e9:5.0f} TF/s)  sum {a+b:6.2f}", flush=True)
torch.backends.cuda.preferred_blas_library("cublas")
del W, h
# Base projection GEMM at beta 0 vs beta 1, and the rank-16 update alone (beta 0 vs 1).
T = 4096
for name, i, o in [("q/o 4096->4096", 4096, 4096), ("k/v 4096->1024", 4096, 1024),
                   ("gate/up 4096->14336", 4096, 14336), ("down 14336->4096", 14336, 4096)]:
    x = torch.randn(T, i, device=dev, dtype=torch.bfloat16)
    w = torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.02
    y = torch.randn(T, o, device=dev, dtype=torch.bfloat16)
    xa = torch.randn(T, 16, device=dev, dtype=torch.bfloat16)
    B = torch.randn(o, 16, device=dev, dtype=torch.bfloat16)
    b0 = t(lambda: torch.mm(x, w.t(), out=y))
    b1 = t(lambda: y.addmm_(x, w.t()))
    r0 = t(lambda: torch.mm(xa, B.t(), out=y))
    r1 = t(lambda: y.addmm_(xa, B.t()))
    # backward dx = dy W (+ beta)
    dy = torch.randn(T, o, device=dev, dtype=torch.bfloat16)
    dx = torch.randn(T, i, device=dev, dtype=torch.bfloat16)
    d0 = t(lambda: torch.mm(dy, w, out=dx))
    d1 = t(lambda: dx.addmm_(dy, w))
    A = torch.randn(16, i, device=dev, dtype=torch.bfloat16)
    dxa = torch.randn(T, 16, device=dev, dtype=torch.bfloat16)
    a0 = t(lambda: torch.mm(dxa, A, out=dx))
    a1 = t(lambda: dx.addmm_(dxa, A))
    print(f"{name:22s} fwd base b0 {b0*1e3:6.1f} us b1 {b1*1e3:6.1f} | rank16 b0 {r0*1e3:5.1f} b1 {r1*1e3:5.1f} || bwd base b0 {d0*1e3:6.1f} b1 {d1*1e3:6.1f} | rank16 b0 {a0*1e3:5.1f} b1 {a1*1e3:5.1f}", flush=True)
    res[name] = dict(b0=b0, b1=b1, r0=r0, r1=r1, d0=d0, d1=d1, a0=a0, a1=a1)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemm_probe.json"), "w"), indent=1)
