#!/usr/bin/env python3
"""Baseline timings for Tigon's fused kernels: PyTorch eager vs Liger-Kernel.

Times the kernel shapes Tigon cares about, forward + backward, on one CUDA GPU,
through (a) PyTorch eager (the HuggingFace formulation) and (b) Liger-Kernel's
Triton kernels, and writes one JSON file plus a short table.

    python3 bench/torch_kernels.py --out results.json [--ops rms_norm,rope] [--iters 25]

Method, per op and system:
  * inputs are built once per op (random normal, never zeros) and shared by
    both systems;
  * every iteration gets fresh clones of the activations and upstream grads,
    made outside the timed region, because several Liger kernels work in place
    (rope on q/k and dq/dk, rms_norm on dy, swiglu/geglu on gate/up, cross
    entropy on the logits) and must not be fed their own previous output;
  * a 256 MiB buffer is written after the clones so the timed work starts with
    a cold L2 (the clones would otherwise leave part of the input in L2);
  * gradients are taken with torch.autograd.grad, not .backward(): nothing is
    accumulated into .grad (so there is no stale .grad to clear), and the
    in-place Liger kernels are not charged for the copy AccumulateGrad makes
    when a returned gradient aliases a live tensor;
  * warm-up iterations, then N iterations each bracketed by one CUDA event
    pair; the median is reported. Host syncs inside an op (Liger's cross
    entropy calls .item()) are part of its cost and are included;
  * peak extra memory: after the inputs exist, reset the peak counter, run one
    forward + backward, report max_memory_allocated() - memory_allocated();
  * "bytes_min" is the least DRAM traffic the op can have (each input read
    once and each output written once per pass; see the per-op note), and
    gbps / frac_copy_bw relate the measured time to it and to a measured
    device-to-device copy.

If liger_kernel cannot be imported the torch rows still run and the liger rows
are marked "unavailable". Errors (OOM included) are recorded per op/system.
"""

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
MIB = 1 << 20
ALL_OPS = ["rms_norm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_prompts", "geglu", "layer_norm"]


# ----------------------------------------------------------------------------
# Liger loading. The Function classes are imported from their submodules
# (liger_kernel.ops.<op>) on purpose: those are always Liger's Triton kernels,
# whereas the package-level names and the transformers-level modules can be
# routed by Liger's dispatcher to other DSLs (CuTe DSL, cuTile) when installed.
# ----------------------------------------------------------------------------

def load_liger():
    """Return (version, error). version is None when liger is unusable."""
    try:
        import liger_kernel  # noqa: F401
        import liger_kernel.ops  # noqa: F401  (surface package-level import errors here, once)
    except Exception as e:  # not just ImportError: a Triton/torch mismatch can raise anything
        return None, f"{type(e).__name__}: {e}"
    try:
        from importlib.metadata import version
        return version("liger_kernel"), None  # from the dist-info next to the package
    except Exception:
        return getattr(sys.modules["liger_kernel"], "__version__", "unknown"), None


def liger_fn(module, name):
    return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name)


# ----------------------------------------------------------------------------
# PyTorch eager references (HuggingFace formulations).
# ----------------------------------------------------------------------------

def hf_rms_norm(x, weight, eps):
    # LlamaRMSNorm.forward: fp32 statistics, cast back, then scale by weight.
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    # Copy of transformers' Llama apply_rotary_pos_emb (rotate_half convention).
    # Copied rather than imported so the eager path does not depend on which
    # transformers version is installed or what it decorates the function with.
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def hf_rope_cos_sin(seq, head_dim, theta, device):
    # LlamaRotaryEmbedding (default rope type): fp32 math, cast to the
    # activation dtype, shape [1, seq, head_dim] (positions shared by the batch).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(seq, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(BF16), emb.sin()[None].to(BF16)


# ----------------------------------------------------------------------------
# Op cases. Each builds its base tensors once and describes:
#   prep()      -> dict of fresh per-iteration tensors (clones; untimed)
#   torch_fwd / liger_fwd (factory) : dict -> tuple of outputs
#   wrt(a)      -> tensors to differentiate w.r.t.
#   grad_out(a) -> upstream grads (None for a scalar loss: autograd uses 1.0)
# ----------------------------------------------------------------------------

class Case:
    def __init__(self, op, shape, prep, torch_fwd, liger_factory, wrt, grad_out, out_names, wrt_names,
                 bytes_min, note, flops=None, extra=None):
        self.op, self.shape, self.prep = op, shape, prep
        self.torch_fwd, self.liger_factory = torch_fwd, liger_factory
        self.wrt, self.grad_out = wrt, grad_out
        self.out_names, self.wrt_names = out_names, wrt_names
        self.bytes_min, self.note, self.flops = bytes_min, note, flops
        self.extra = extra or {}  # fixed facts copied into each row (e.g. weight_requires_grad)


def fresh(t, requires_grad=False):
    # detach().clone() keeps the strides (rope's HF layout) and makes a leaf.
    c = t.detach().clone()
    return c.requires_grad_() if requires_grad else c


def case_rms_norm(dev):
    M, H, eps = 8192, 4096, 1e-6
    x0 = torch.randn(M, H, device=dev, dtype=BF16)
    dy0 = torch.randn(M, H, device=dev, dtype=BF16)
    w = (1.0 + 0.1 * torch.randn(H, device=dev)).to(BF16)  # frozen under LoRA: requires_grad False

    def prep():
        return {"x": fresh(x0, True), "dy": fresh(dy0)}  # Liger (in_place=True) writes dx into dy

    def liger():
        fn = liger_fn("rms_norm", "LigerRMSNormFunction")
        # forward(ctx, X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None);
        # these are LigerRMSNorm's defaults. needs_input_grad[1] is False -> no dW pass.
        return lambda a: (fn.apply(a["x"], w, eps, 0.0, "llama", True, None),)

    E = M * H
    # fwd: read x, w; write y, rstd(fp32). bwd: read dy, x, w, rstd; write dx.
    nbytes = 2 * E + 2 * H + 2 * E + 4 * M + 2 * E + 2 * E + 2 * H + 4 * M + 2 * E
    return Case("rms_norm", f"x[{M},{H}] bf16, w[{H}] frozen, eps {eps}",
                prep, lambda a: (hf_rms_norm(a["x"], w, eps),), liger,
                lambda a: (a["x"],), lambda a: (a["dy"],), ["y"], ["dx"], nbytes,
                "weight.requires_grad=False: backward computes dx only; Llama casting",
                extra={"weight_requires_grad": False})


def _glu_case(op, dev, torch_act, liger_module, liger_name):
    M, N = 8192, 14336
    g0 = torch.randn(M, N, device=dev, dtype=BF16)
    u0 = torch.randn(M, N, device=dev, dtype=BF16)
    dy0 = torch.randn(M, N, device=dev, dtype=BF16)

    def prep():
        # Liger's backward overwrites gate/up with dgate/dup, so clone them.
        return {"gate": fresh(g0, True), "up": fresh(u0, True), "dy": fresh(dy0)}

    def liger():
        fn = liger_fn(liger_module, liger_name)
        return lambda a: (fn.apply(a["gate"], a["up"]),)

    E = M * N
    # fwd: read gate, up; write out. bwd: read dout, gate, up; write dgate, dup.
    nbytes = 2 * E * (3 + 5)
    return Case(op, f"gate,up[{M},{N}] bf16", prep,
                lambda a: (torch_act(a["gate"]) * a["up"],), liger,
                lambda a: (a["gate"], a["up"]), lambda a: (a["dy"],), ["out"], ["dgate", "dup"], nbytes,
                "out = act(gate) * up")


def case_swiglu(dev):
    return _glu_case("swiglu", dev, F.silu, "swiglu", "LigerSiLUMulFunction")


def case_geglu(dev):
    return _glu_case("geglu", dev, lambda g: F.gelu(g, approximate="tanh"), "geglu", "LigerGELUMulFunction")


def case_rope(dev):
    B, Hq, Hk, S, D, theta = 4, 32, 8, 2048, 128, 500000.0
    # HF layout: q_proj(x).view(B, S, H, D).transpose(1, 2), i.e. logical
    # [B, H, S, D] over [B, S, H, D] storage. Liger's kernel reads the physical
    # [B, S, H, D] layout; a contiguous [B, H, S, D] q would cost it a copy.
    def hf_layout(h):
        return torch.randn(B, S, h, D, device=dev, dtype=BF16).transpose(1, 2)

    q0, k0, dq0, dk0 = hf_layout(Hq), hf_layout(Hk), hf_layout(Hq), hf_layout(Hk)
    cos, sin = hf_rope_cos_sin(S, D, theta, dev)

    def prep():
        # Liger rotates q/k in forward and dq/dk in backward in place.
        return {"q": fresh(q0, True), "k": fresh(k0, True), "dq": fresh(dq0), "dk": fresh(dk0)}

    def liger():
        fn = liger_fn("rope", "LigerRopeFunction")
        # forward(ctx, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None) -> (q, k)
        return lambda a: tuple(fn.apply(a["q"], a["k"], cos, sin))

    Q, K, C = B * Hq * S * D, B * Hk * S * D, S * D
    # per pass (fwd, then bwd on dq/dk): read q,k,cos,sin; write q,k.
    nbytes = 2 * (2 * (2 * Q + 2 * K) + 2 * 2 * C)
    return Case("rope", f"q[{B},{Hq},{S},{D}] k[{B},{Hk},{S},{D}] bf16 (HF transposed layout), "
                f"cos/sin[1,{S},{D}], theta {theta:g}", prep,
                lambda a: hf_apply_rotary_pos_emb(a["q"], a["k"], cos, sin), liger,
                lambda a: (a["q"], a["k"]), lambda a: (a["dq"], a["dk"]), ["q_out", "k_out"], ["dq", "dk"],
                nbytes, "rotate_half convention; torch = HF apply_rotary_pos_emb")


def _labels(n, vocab, dev):
    g = torch.Generator(device=dev)
    g.manual_seed(1234)
    labels = torch.randint(0, vocab, (n,), device=dev, generator=g)
    labels[torch.rand(n, device=dev, generator=g) < 0.1] = -100
    return labels


def case_cross_entropy(dev):
    N, V = 8192, 128256
    logits0 = torch.randn(N, V, device=dev, dtype=BF16)
    labels = _labels(N, V, dev)

    def prep():
        # Liger writes dlogits into the logits buffer during forward.
        return {"logits": fresh(logits0, True)}

    def liger():
        fn = liger_fn("cross_entropy", "LigerCrossEntropyFunction")
        # forward(ctx, _input, target, weight, ignore_index, lse_square_scale, label_smoothing,
        #         reduction, softcap, return_z_loss, return_token_accuracy, return_predicted_tokens)
        # -> (loss, z_loss, token_accuracy, predicted_tokens)
        return lambda a: (fn.apply(a["logits"], labels, None, -100, 0.0, 0.0, "mean", None,
                                   False, False, False)[0],)

    # The loss is terminal (dloss = 1), so fwd+bwd can be one pass: read logits
    # and labels once, write dlogits once.
    nbytes = 2 * N * V + 8 * N + 2 * N * V
    return Case("cross_entropy", f"logits[{N},{V}] bf16, labels int64 ~10% -100, mean", prep,
                lambda a: (F.cross_entropy(a["logits"].float(), labels, ignore_index=-100),), liger,
                lambda a: (a["logits"],), lambda a: None, ["loss"], ["dlogits"], nbytes,
                "torch upcasts logits to fp32 (HF); bytes_min = one fused pass (read logits, write dlogits); "
                "Liger computes dlogits during forward, so its ms_fwd includes the gradient")


def _prompt_labels(n, vocab, dev, run=512, runs_seed=1234):
    """Like an instruction-tuning batch: runs of 1 to `run` ignored tokens (prompts)
    alternating with runs of 1 to `run` labelled ones. The run lengths come from the 64-bit
    LCG tigon's `prompt_like_labels` uses, with the seed of its benchmark, so both time the
    same rows; the label values (which do not change the work) differ."""
    g = torch.Generator(device=dev)
    g.manual_seed(1234)
    state, out, prompt = runs_seed, [], True
    mask = (1 << 64) - 1
    while len(out) < n:
        state = (state * 6364136223846793005 + 1442695040888963407) & mask
        k = min(1 + (state >> 33) % run, n - len(out))
        out += [-100] * k if prompt else [-1] * k
        prompt = not prompt
    labels = torch.tensor(out, device=dev, dtype=torch.int64)
    keep = labels == -1
    labels[keep] = torch.randint(0, vocab, (int(keep.sum()),), device=dev, generator=g)
    return labels


def case_flce_prompts(dev):
    return case_flce(dev, prompts=True)


def case_flce(dev, prompts=False):
    N, H, V = 8192, 4096, 128256
    h0 = torch.randn(N, H, device=dev, dtype=BF16)
    W = (0.02 * torch.randn(V, H, device=dev)).to(BF16)  # lm_head, frozen
    labels = _prompt_labels(N, V, dev) if prompts else _labels(N, V, dev)
    labelled = int((labels != -100).sum())

    def prep():
        return {"h": fresh(h0, True)}

    def torch_fwd(a):
        logits = a["h"] @ W.t()
        return (F.cross_entropy(logits.float(), labels, ignore_index=-100),)

    def liger():
        fn = liger_fn("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
        # forward(ctx, _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        #         label_smoothing, reduction, softcap, return_z_loss, accum_dtype, use_token_scaling,
        #         return_token_accuracy, return_predicted_tokens, ce_impl=None, ce_mode=None,
        #         chunk_mem_const=1) -> (loss, z_loss, token_accuracy, predicted_tokens).
        # ce_impl=None keeps the inner CE on Liger's Triton kernel (no dispatcher).
        return lambda a: (fn.apply(a["h"], W, labels, None, None, -100, 0.0, 0.0, "mean", None,
                                   False, None, False, False, False)[0],)

    nbytes = 2 * N * H + 2 * V * H + 8 * N + 2 * N * H  # read h, W, labels; write dh
    flops = 2 * N * H * V + 2 * N * H * V  # logits GEMM + d_hidden GEMM (no dW: W frozen)
    name, what = "fused_linear_cross_entropy", "labels ~10% -100"
    if prompts:
        name, what = name + "_prompts", f"prompt-like labels, {labelled} labelled"
    return Case(name,
                f"hidden[{N},{H}] bf16, lm_head[{V},{H}] bf16 frozen, {what}", prep,
                torch_fwd, liger, lambda a: (a["h"],), lambda a: None, ["loss"], ["dhidden"], nbytes,
                "torch: logits = h @ W^T then CE on logits.float(); W.requires_grad=False so no dW; "
                "Liger computes dh during forward (chunked), so its ms_fwd includes the gradient",
                flops=flops, extra={"weight_requires_grad": False})


def case_layer_norm(dev):
    M, H, eps = 8192, 4096, 1e-5
    x0 = torch.randn(M, H, device=dev, dtype=BF16)
    dy0 = torch.randn(M, H, device=dev, dtype=BF16)
    w = (1.0 + 0.1 * torch.randn(H, device=dev)).to(BF16).requires_grad_()
    b = (0.1 * torch.randn(H, device=dev)).to(BF16).requires_grad_()

    def prep():
        return {"x": fresh(x0, True), "dy": fresh(dy0)}

    def liger():
        fn = liger_fn("layer_norm", "LigerLayerNormFunction")
        return lambda a: (fn.apply(a["x"], w, b, eps),)  # forward(ctx, X, W, B, eps)

    E = M * H
    # fwd: read x, w, b; write y, mean, rstd. bwd: read dy, x, w, mean, rstd; write dx, dw, db.
    nbytes = (2 * E + 4 * H + 2 * E + 8 * M) + (2 * E + 2 * E + 2 * H + 8 * M + 2 * E + 4 * H)
    return Case("layer_norm", f"x[{M},{H}] bf16, w,b[{H}] bf16 trainable, eps {eps}", prep,
                lambda a: (F.layer_norm(a["x"], (H,), w, b, eps),), liger,
                lambda a: (a["x"], w, b), lambda a: (a["dy"],), ["y"], ["dx", "dw", "db"], nbytes,
                "weight and bias require grad", extra={"weight_requires_grad": True})


CASES = {
    "rms_norm": case_rms_norm,
    "swiglu": case_swiglu,
    "rope": case_rope,
    "cross_entropy": case_cross_entropy,
    "fused_linear_cross_entropy": case_flce,
    "fused_linear_cross_entropy_prompts": case_flce_prompts,
    "geglu": case_geglu,
    "layer_norm": case_layer_norm,
}


# ----------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------

def time_median_ms(run, prep, iters, warmup, flush=None):
    for _ in range(warmup):
        a = prep()
        r = run(a)
        del a, r
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        a = prep()  # previous iteration's tensors are already freed: no 2x footprint
        if flush is not None:
            flush.zero_()
        starts[i].record()
        r = run(a)
        ends[i].record()
        del a, r
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def peak_extra_mib(run, prep):
    a = prep()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = run(a)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del a, r
    return peak / MIB


def measure_copy_gbps(iters, warmup):
    n = (2 << 30) // 2  # 2 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=BF16)
    dst = torch.empty_like(src)
    ms = time_median_ms(lambda _: dst.copy_(src), lambda: None, iters, warmup)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9, ms  # bytes read + written


def measure_gemm_tflops(iters, warmup):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=BF16)
    b = torch.randn(n, n, device="cuda", dtype=BF16)
    c = torch.empty(n, n, device="cuda", dtype=BF16)
    ms = time_median_ms(lambda _: torch.mm(a, b, out=c), lambda: None, iters, warmup)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, ms


def rel_err(x, y, chunk=1 << 26):
    """max|x - y| / max|y|, in fp32 chunks so the temporaries stay small."""
    x, y = x.detach().reshape(-1), y.detach().reshape(-1)
    num = den = 0.0
    for i in range(0, y.numel(), chunk):
        xs, ys = x[i:i + chunk].float(), y[i:i + chunk].float()
        num = max(num, (xs - ys).abs().max().item())
        den = max(den, ys.abs().max().item())
    return num / den if den > 0 else num


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def short_error(e):
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 500 else msg[:500] + "..."


def run_system(case, system, fwd, args, flush, copy_gbps, gemm_tflops):
    def fwd_bwd(a):
        outs = fwd(a)
        return torch.autograd.grad(outs, case.wrt(a), case.grad_out(a))

    row = {"op": case.op, "shape": case.shape, "system": system}
    row["ms_fwd_bwd"] = time_median_ms(fwd_bwd, case.prep, args.iters, args.warmup, flush)
    # Forward as run in training (inputs require grad, graph is built and dropped).
    row["ms_fwd"] = time_median_ms(fwd, case.prep, args.iters, args.warmup, flush)
    row["peak_extra_mib"] = peak_extra_mib(fwd_bwd, case.prep)
    row["bytes_min"] = case.bytes_min
    row["gbps"] = case.bytes_min / (row["ms_fwd_bwd"] * 1e-3) / 1e9
    row["frac_copy_bw"] = row["gbps"] / copy_gbps if copy_gbps else None
    if case.flops:
        row["flops"] = case.flops
        row["tflops"] = case.flops / (row["ms_fwd_bwd"] * 1e-3) / 1e12
        row["frac_gemm"] = row["tflops"] / gemm_tflops if gemm_tflops else None
    row.update(case.extra)
    row["note"] = case.note
    row["status"] = "ok"

    # One more untimed run whose results are kept for the torch-vs-liger check.
    # A failure here must not throw away the timings above.
    results = None
    try:
        a = case.prep()
        outs = fwd(a)
        grads = torch.autograd.grad(outs, case.wrt(a), case.grad_out(a))
        results = [o.detach() for o in outs] + list(grads)
        del a, outs, grads
    except Exception as e:
        row["check_error"] = short_error(e)
    return row, results


def failed_row(op, shape, system, status, error):
    # Same keys as a measured row, so consumers need not special-case failures.
    return {"op": op, "shape": shape, "system": system, "status": status, "error": error,
            "ms_fwd_bwd": None, "ms_fwd": None, "peak_extra_mib": None, "gbps": None, "frac_copy_bw": None}


def bench_op(name, dev, args, liger_version, liger_error, flush, copy_gbps, gemm_tflops):
    rows = []
    try:
        case = CASES[name](dev)
    except Exception as e:  # e.g. OOM while building inputs
        err = "building inputs: " + short_error(e)
        free_memory()
        return [failed_row(name, None, s, "error", err) for s in ("torch", "liger")]

    names = case.out_names + case.wrt_names
    ref = None
    for system in ("torch", "liger"):
        if system == "liger" and liger_version is None:
            rows.append(failed_row(case.op, case.shape, "liger", "unavailable",
                                   f"liger_kernel not importable: {liger_error}"))
            continue
        try:
            fwd = case.torch_fwd if system == "torch" else case.liger_factory()
            row, results = run_system(case, system, fwd, args, flush, copy_gbps, gemm_tflops)
            if system == "torch":
                row["impl"] = "PyTorch eager (HF formulation)"
                ref = results
            else:
                row["impl"] = "Liger Triton kernels (liger_kernel.ops.* Function, not the dispatcher)"
                if ref is not None and results is not None:
                    # max|liger - torch| / max|torch| per output and per gradient
                    try:
                        row["rel_err_vs_torch"] = {n: rel_err(x, y) for n, x, y in zip(names, results, ref)}
                    except Exception as e:
                        row["check_error"] = short_error(e)
            del results
            rows.append(row)
        except Exception as e:
            rows.append(failed_row(case.op, case.shape, system, "error", short_error(e)))
        free_memory()
    del case, ref
    free_memory()
    return rows


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def write_json_atomic(path, obj):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(result):
    print(f"GPU {result['gpu']} | torch {result['torch']} | liger {result['liger']} | "
          f"copy {result['copy_gbps']:.0f} GB/s | bf16 GEMM {result['gemm_tflops']:.0f} TFLOP/s")
    hdr = (f"{'op':<27}{'system':<7}{'fwd+bwd ms':>11}{'fwd ms':>9}{'peak MiB':>10}"
           f"{'GB/s':>8}{'%copy':>7}{'TFLOP/s':>9}{'vs torch':>9}{'max rel err':>12}")
    print(hdr)
    print("-" * len(hdr))
    torch_ms = {}
    for r in result["rows"]:
        if r.get("status") != "ok":
            print(f"{r['op']:<27}{r['system']:<7}  {r.get('status')}: {r.get('error', '')[:80]}")
            continue
        if r["system"] == "torch":
            torch_ms[r["op"]] = r["ms_fwd_bwd"]
        speed = torch_ms.get(r["op"]) / r["ms_fwd_bwd"] if r["system"] != "torch" and r["op"] in torch_ms else None
        err = max(r["rel_err_vs_torch"].values()) if r.get("rel_err_vs_torch") else None
        frac = r["frac_copy_bw"] * 100 if r.get("frac_copy_bw") is not None else None
        print(f"{r['op']:<27}{r['system']:<7}{r['ms_fwd_bwd']:>11.3f}{r['ms_fwd']:>9.3f}"
              f"{r['peak_extra_mib']:>10.0f}{r['gbps']:>8.0f}{fmt(frac, '.0f'):>7}"
              f"{fmt(r.get('tflops'), '.0f'):>9}{fmt(speed, '.2f') + ('x' if speed else ''):>9}"
              f"{fmt(err, '.1e'):>12}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON output path (written atomically)")
    p.add_argument("--ops", default=",".join(ALL_OPS), help="comma-separated subset of: " + ",".join(ALL_OPS))
    p.add_argument("--iters", type=int, default=25, help="timed iterations per measurement (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compiles Triton)")
    args = p.parse_args()

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in CASES]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {ALL_OPS}")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if not torch.cuda.is_available():
        print("CUDA is not available; nothing to benchmark", file=sys.stderr)
        return 1

    t0 = time.time()
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    liger_version, liger_error = load_liger()

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    props = torch.cuda.get_device_properties(dev)
    result = {
        "gpu": torch.cuda.get_device_name(dev),
        "cc": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "liger": liger_version,
        "liger_error": liger_error,
        "iters": args.iters,
        "warmup": args.warmup,
        "method": "median of per-iteration CUDA-event times; fresh input clones and an L2 flush "
                  "outside the timed region; grads via torch.autograd.grad",
    }

    copy_gbps, copy_ms = measure_copy_gbps(max(args.iters, 20), args.warmup)
    gemm_tflops, gemm_ms = measure_gemm_tflops(max(args.iters, 20), args.warmup)
    result.update({"copy_gbps": copy_gbps, "copy_ms_2gib": copy_ms,
                   "gemm_tflops": gemm_tflops, "gemm_ms_8192": gemm_ms, "rows": []})
    free_memory()

    # Larger than H100's 50 MB L2: writing it evicts whatever the clones left there.
    flush = torch.empty(256 * MIB, dtype=torch.uint8, device=dev)
    for name in ops:
        result["rows"].extend(bench_op(name, dev, args, liger_version, liger_error, flush,
                                       copy_gbps, gemm_tflops))
        result["elapsed_s"] = time.time() - t0
        write_json_atomic(args.out, result)  # partial results survive a later crash
    write_json_atomic(args.out, result)

    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
