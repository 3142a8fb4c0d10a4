#!/usr/bin/env python3
"""LoRA training: Hugging Face transformers + PEFT, the same plus Liger-Kernel, and tigon,
on one GPU, on the same weights, the same adapter and the same token batches.

    python3 bench/hf_compare.py --shapes 1b,8b --out $OUT [--steps 8 --warmup 3]

Per shape (Llama-3.2-1B at batch 4 x seq 2048, Llama-3-8B at batch 2 x seq 2048):
  1. prepare (one subprocess): build the Llama config through transformers, create the
     model with random weights directly on the GPU in bf16 (seeded; transformers' own
     init: N(0, 0.02) linears and embedding, unit norms), save_pretrained it as
     safetensors; create the PEFT adapter (r 16, alpha 32, dropout 0, the seven
     projections, PEFT's default init: A kaiming-uniform, B zero) and save it; draw the
     token batches (Zipf-distributed ids over a random 4096-token subset of the vocabulary,
     so there is something to learn) into batches.safetensors, int32 [steps, batch, seq].
  2. for hf-peft and hf-peft-liger, checkpointing off and on, each in its own subprocess
     (so memory and Liger's monkey-patching do not leak between variants): load the model
     (bf16, SDPA attention) and the saved adapter (fp32, trainable), then one
     torch.optim.AdamW(lr 1e-4, weight_decay 0.01 = torch's default, fused) step per batch,
     no clipping, labels = input_ids (transformers shifts them).
  3. `tigon bench train` on the same folder, adapter and batches, checkpointing off and on;
     and for the shapes of --offload-shapes (default 8b) once more with checkpointing and CPU
     offload (--offload-embedding --offload-layers N): a row with system "tigon" and an
     `offload` object, shown as "tigon (ckpt+offload)", whose losses must match those of
     the tigon checkpointing row within 2^-9 relative (`offload_loss_maxrel_vs_tigon`,
     `offload_losses_match`). Bitwise equality holds on the CPU (tests), not between two
     GPU runs: the attention backward accumulates dq in fp32 atomics, so even two runs of
     the same tigon variant differ in the last bits after the first step.

Timing, the same on both sides: the first --warmup steps are untimed (they train; their
losses are kept); every later step (forward, backward, optimizer step, zeroing the grads)
is bracketed by two CUDA events and tokens/s = tokens per step / the median step time. The
loss read-back after each step is outside the events. Peak memory: the most held in live
allocations from the first step to the last, weights included (torch:
max_memory_allocated after reset_peak_memory_stats; tigon: its pool's live-byte peak).

MFU = tokens/s x FLOPs per token / 790e12, FLOPs per token = 4 N + 6 seq d_attn L, where N
counts the weights that multiply activations (the seven projections of every layer and the
LM head): 2N forward + 2N for the activation gradients (frozen base; LoRA's own FLOPs left
out); attention is causal, so each query sees seq/2 keys on average: QK^T and PV cost
2 x 2 x (seq/2) x d_attn per token and layer forward, the backward twice that. Recomputation
(checkpointing) is not counted. The same formula for every system, so MFU ratios are
tokens/s ratios.

Loss agreement: every system starts from the same weights and adapter and sees the same
batches, so the losses must agree step by step. The check is |loss - loss_hf-peft| <=
2^-9 |loss_hf-peft| (half a bf16 rounding step of the loss value) at every step, against
hf-peft with the same checkpointing setting; Liger's deviation is printed beside tigon's
as the spread of two correct implementations.

Output: $OUT/results.jsonl (one object per variant), $OUT/logs/*, and a table printed last.
A variant that runs out of memory is recorded with status "oom"; one that fails otherwise,
"error" (with the last lines of its log).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

PEAK_TFLOPS = 790.0
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = ["hf-peft", "hf-peft-liger", "tigon"]
LOSS_RTOL = 2.0 ** -9

SHAPES = {
    # meta-llama/Llama-3.2-1B's config.json (tied embeddings, llama3 rope scaling).
    "1b": dict(
        name="llama-3.2-1b", batch=4, seq=2048,
        config=dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192),
            tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
            initializer_range=0.02, bos_token_id=128000, eos_token_id=128001),
    ),
    # meta-llama/Meta-Llama-3-8B's config.json.
    "8b": dict(
        name="llama-3-8b", batch=2, seq=2048,
        config=dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling=None, tie_word_embeddings=False, hidden_act="silu",
            attention_bias=False, mlp_bias=False, initializer_range=0.02,
            bos_token_id=128000, eos_token_id=128001),
    ),
}


def flops_per_token(cfg, seq):
    """4 N + 6 seq d_attn L (see the module docstring); the same as tigon's."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q_dim = cfg["num_attention_heads"] * head_dim
    kv_dim = cfg["num_key_value_heads"] * head_dim
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter
    n = per_layer * layers + cfg["vocab_size"] * h
    return 4.0 * n + 6.0 * seq * q_dim * layers


def today():
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def paths(work, shape):
    root = os.path.join(work, shape)
    return dict(root=root, model=os.path.join(root, "model"),
                adapter=os.path.join(root, "adapter"),
                batches=os.path.join(root, "batches.safetensors"),
                meta=os.path.join(root, "meta.json"))


def dtype_kwarg(transformers):
    """from_pretrained's dtype argument: `dtype` from transformers 4.56, `torch_dtype` before."""
    try:
        from packaging.version import Version
        return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    except Exception:
        return "torch_dtype"


# ----------------------------------------------------------------------------
# Children: prepare one shape; train one HF variant.
# ----------------------------------------------------------------------------

def child_prepare(a):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    spec = SHAPES[a.shape]
    p = paths(a.work, a.shape)
    need = dict(shape=a.shape, seed=a.seed, steps=a.warmup + a.steps, batch=spec["batch"],
                seq=spec["seq"], r=a.lora_r, alpha=a.lora_alpha)
    if os.path.exists(p["meta"]):
        with open(p["meta"]) as f:
            if json.load(f) == need:
                print(f"{a.shape}: reusing {p['root']}")
                return 0
    os.makedirs(p["root"], exist_ok=True)
    t0 = time.time()
    cfg = transformers.LlamaConfig(**spec["config"])
    torch.manual_seed(a.seed)
    # Created on the GPU in bf16: seconds, where a CPU f32 init of 8B takes minutes.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(p["model"], safe_serialization=True)
    t1 = time.time()

    torch.manual_seed(a.seed + 1)
    lcfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                      target_modules=PROJ, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(p["adapter"])
    del peft_model, model
    torch.cuda.empty_cache()

    g = torch.Generator().manual_seed(a.seed + 2)
    vocab = spec["config"]["vocab_size"]
    subset = torch.randperm(vocab, generator=g)[:4096]
    zipf = 1.0 / torch.arange(1, 4097, dtype=torch.float64)
    n = need["steps"] * spec["batch"] * spec["seq"]
    idx = torch.multinomial(zipf, n, replacement=True, generator=g)
    ids = subset[idx].to(torch.int32).reshape(need["steps"], spec["batch"], spec["seq"])
    save_file({"input_ids": ids.contiguous()}, p["batches"])
    write_json_atomic(p["meta"], need)
    print(f"{a.shape}: model saved in {t1 - t0:.1f} s, adapter and batches in "
          f"{time.time() - t1:.1f} s ({p['root']})")
    return 0


def child_train(a):
    import torch
    import transformers

    spec = SHAPES[a.shape]
    p = paths(a.work, a.shape)
    row = dict(system=a.system, status="error")
    try:
        versions = dict(torch=torch.__version__, transformers=transformers.__version__)
        import peft
        from peft import PeftModel
        versions["peft"] = peft.__version__
        if a.system == "hf-peft-liger":
            # Patch transformers' Llama classes before the model is built: RMSNorm, RoPE,
            # SwiGLU, and the LM head fused into the loss (no logits materialised).
            from importlib.metadata import version
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            versions["liger_kernel"] = version("liger_kernel")
            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=True)
        row["versions"] = versions
        t0 = time.time()
        kw = {dtype_kwarg(transformers): torch.bfloat16}
        try:
            model = transformers.LlamaForCausalLM.from_pretrained(
                p["model"], attn_implementation="sdpa", device_map="cuda", **kw)
        except (ImportError, ValueError) as e:
            if "accelerate" not in str(e).lower():
                raise
            model = transformers.LlamaForCausalLM.from_pretrained(
                p["model"], attn_implementation="sdpa", **kw).to("cuda")
        row["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        model.config.use_cache = False
        if a.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PeftModel.from_pretrained(model, p["adapter"], is_trainable=True)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        # LoRA weights in fp32 as tigon keeps them (PEFT's autocast_adapter_dtype does this
        # already for a bf16 model; made sure here, and what PEFT gave is recorded).
        row["trainable_dtypes_loaded"] = sorted({str(q.dtype) for q in params})
        for q in params:
            if q.dtype != torch.float32:
                q.data = q.data.float()
        row["trainable_params"] = sum(q.numel() for q in params)
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay, fused=True)
        from safetensors.torch import load_file
        ids = load_file(p["batches"])["input_ids"].to("cuda", torch.long)
        torch.cuda.synchronize()
        row["load_s"] = time.time() - t0

        torch.cuda.reset_peak_memory_stats()
        losses, step_ms = [], []
        timed_wall = None
        for i in range(a.warmup + a.steps):
            x = ids[i]
            if i == a.warmup:
                torch.cuda.synchronize()
                timed_wall = time.perf_counter()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(input_ids=x, labels=x, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end.record()
            loss = out.loss.item()
            del out
            if loss != loss or loss in (float("inf"), float("-inf")):
                raise RuntimeError(f"step {i}: loss is {loss}")
            losses.append(loss)
            if i >= a.warmup:
                end.synchronize()
                step_ms.append(start.elapsed_time(end))
        torch.cuda.synchronize()
        wall = time.perf_counter() - timed_wall
        tokens = spec["batch"] * spec["seq"]
        med = statistics.median(step_ms)
        fpt = flops_per_token(spec["config"], spec["seq"])
        row.update(
            status="ok", tokens_per_step=tokens, median_step_ms=med, step_ms=step_ms,
            tok_s=tokens / (med / 1e3), tok_s_wall=tokens * a.steps / wall,
            flops_per_token=fpt, peak_tflops=PEAK_TFLOPS,
            mfu=tokens / (med / 1e3) * fpt / (PEAK_TFLOPS * 1e12),
            peak_bytes=torch.cuda.max_memory_allocated(),
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
            losses=losses, gpu=torch.cuda.get_device_name(0))
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:  # recorded, not raised: the other variants still run
        import traceback
        traceback.print_exc()
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    write_json_atomic(a.json, row)
    return 0


# ----------------------------------------------------------------------------
# Parent: run every variant, collect, compare, print.
# ----------------------------------------------------------------------------

class Runner:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.logs = os.path.join(a.out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def left(self):
        return self.a.deadline - (time.time() - self.t0)

    def run(self, name, cmd, timeout):
        """Run cmd with its output in logs/name.log; returns (rc or 'timeout' or 'skipped', tail)."""
        budget = min(timeout, self.left())
        if budget < 20:
            return "skipped", "no time left before --deadline"
        log = os.path.join(self.logs, name + ".log")
        t = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=budget).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        with open(log) as f:
            tail = f.read()[-1500:]
        print(f"  {name}: rc {rc}, {time.time() - t:.0f} s", flush=True)
        return rc, tail


def child_cmd(a, what, shape, extra):
    return [sys.executable, os.path.abspath(__file__), "--child", what, "--shape", shape,
            "--work", a.work, "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--lr", str(a.lr), "--weight-decay", str(a.weight_decay),
            "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha),
            "--seed", str(a.seed)] + extra


def run_variant(r, a, shape, system, ckpt, offload=False):
    spec, p = SHAPES[shape], paths(a.work, shape)
    name = f"{shape}-{system}-{'ckpt' if ckpt else 'nockpt'}" + ("-offload" if offload else "")
    jpath = os.path.join(a.out, "logs", name + ".json")
    if os.path.exists(jpath):
        os.remove(jpath)
    if system == "tigon":
        cmd = [a.tigon, "bench", "train", "--model", p["model"], "--batches", p["batches"],
               "--adapter", p["adapter"], "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--lr", str(a.lr), "--weight-decay", str(a.weight_decay),
               "--shape", spec["name"], "--json", jpath] + (["--checkpointing"] if ckpt else [])
        if offload:
            cmd += ["--offload-embedding", "--offload-layers", str(a.offload_layers)]
    else:
        cmd = child_cmd(a, "train", shape, ["--system", system, "--json", jpath]
                        + (["--ckpt"] if ckpt else []))
    rc, tail = r.run(name, cmd, a.variant_timeout)
    if os.path.exists(jpath):
        with open(jpath) as f:
            row = json.load(f)
    elif rc in ("timeout", "skipped"):
        row = dict(status=rc, error=tail[-600:])
    else:
        row = dict(status="error", error=tail[-600:])
    if row.get("status") not in ("ok", "oom"):
        row.setdefault("error", tail[-600:])
        # torch raises some OOMs as plain RuntimeErrors ("CUDA error: out of memory").
        if "out of memory" in str(row.get("error", "")).lower():
            row["status"] = "oom"
    row.update(system=system, shape=spec["name"], batch=spec["batch"], seq=spec["seq"],
               checkpointing=ckpt, warmup=a.warmup, steps=a.steps, lr=a.lr,
               weight_decay=a.weight_decay, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
               peak_tflops=PEAK_TFLOPS, command=a.command)
    row.setdefault("date", today())
    for k in ("tok_s", "peak_gib", "mfu", "gpu"):
        row.setdefault(k, None)
    if offload:  # tigon writes the resolved settings; keep the request when it did not run
        row.setdefault("offload", dict(embedding=True, layers=a.offload_layers))
    return row


def label(r):
    """A tigon row with CPU offload is its own variant."""
    if r["system"] == "tigon" and r.get("offload"):
        return "tigon (ckpt+offload)" if r["checkpointing"] else "tigon (offload)"
    return r["system"]


def compare_offload(rows):
    """Offload moves weights, not arithmetic: an offload row's losses must be those of
    tigon's row with the same checkpointing setting, up to the run-to-run spread of the GPU
    (fp32 atomics in the attention backward), held to the same 2^-9 as the HF match."""
    plain = {(r["shape"], r["checkpointing"]): r.get("losses") for r in rows
             if r["system"] == "tigon" and not r.get("offload") and r.get("status") == "ok"}
    for r in rows:
        base = plain.get((r["shape"], r["checkpointing"]))
        losses = r.get("losses")
        if r.get("offload") and r.get("status") == "ok" and base and losses:
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, base))
            r["offload_loss_maxrel_vs_tigon"] = rel
            r["offload_losses_match"] = len(losses) == len(base) and rel <= 2.0 ** -9


def compare_losses(rows):
    """Max |loss - hf-peft's| over the steps, against hf-peft with the same checkpointing
    (or the other setting when that one has no losses)."""
    ref = {}
    for r in rows:
        if r["system"] == "hf-peft" and r.get("losses"):
            ref[(r["shape"], r["checkpointing"])] = r["losses"]
    for r in rows:
        base = ref.get((r["shape"], r["checkpointing"])) or ref.get((r["shape"], not r["checkpointing"]))
        if not r.get("losses") or not base or r["system"] == "hf-peft":
            continue
        n = min(len(base), len(r["losses"]))
        diffs = [abs(x - y) for x, y in zip(r["losses"][:n], base[:n])]
        worst = max(range(n), key=lambda i: diffs[i] / abs(base[i]))
        r["loss_maxdiff_vs_hf"] = max(diffs)
        r["loss_maxrel_vs_hf"] = diffs[worst] / abs(base[worst])
        r["loss_tol_rel"] = LOSS_RTOL
        r["loss_match"] = all(d <= LOSS_RTOL * abs(b) for d, b in zip(diffs, base[:n]))


def print_table(rows):
    hf = {(r["shape"], r["checkpointing"]): r.get("tok_s") for r in rows
          if r["system"] == "hf-peft" and r.get("status") == "ok"}
    print()
    print(f"{'shape':<13} {'system':<14} {'ckpt':<4} {'tok/s':>8} {'x hf':>6} {'peak GiB':>9} "
          f"{'MFU':>6} {'max|dloss|':>11} {'rel':>8}  match")
    for r in rows:
        ok = r.get("status") == "ok"
        base = hf.get((r["shape"], r["checkpointing"]))
        cells = [f"{r['shape']:<13}", f"{label(r):<14}", f"{'on' if r['checkpointing'] else 'off':<4}"]
        if ok:
            cells += [f"{r['tok_s']:>8.0f}",
                      f"{r['tok_s'] / base:>6.2f}" if base else f"{'-':>6}",
                      f"{r['peak_gib']:>9.2f}", f"{100 * r['mfu']:>5.1f}%"]
            if "loss_maxdiff_vs_hf" in r:
                cells += [f"{r['loss_maxdiff_vs_hf']:>11.2e}", f"{r['loss_maxrel_vs_hf']:>8.1e}",
                          " yes" if r["loss_match"] else " NO"]
            else:
                cells += [f"{'-':>11}", f"{'-':>8}", "   -"]
        else:
            cells += [f"{r.get('status', 'error').upper():>8}"]
        print(" ".join(cells))
    for r in rows:
        if r.get("status") == "ok" and r.get("losses"):
            print(f"losses {r['shape']} {label(r)} ckpt={'on' if r['checkpointing'] else 'off'}: "
                  + " ".join(f"{x:.5f}" for x in r["losses"]))
    for r in rows:
        if "offload_losses_match" in r:
            o = r["offload"]
            print(f"offload {r['shape']}: embedding on the host {o.get('embedding_on_host')}, "
                  f"streamed layers {o.get('streamed_layers')}, "
                  f"{o.get('layer_copies_per_step')} layer copies per step; losses vs tigon "
                  f"without offload: max rel {r['offload_loss_maxrel_vs_tigon']:.1e} "
                  f"({'match' if r['offload_losses_match'] else 'NO MATCH'})")
    print(f"loss match: |loss - hf-peft| <= 2^-9 |loss| at every step (half a bf16 step of the value)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--work", default="/tmp/hfc")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--tigon", default=".gpu/tigon")
    ap.add_argument("--profile", action="store_true",
                    help="also run tigon once per shape with --profile (phase times) into $OUT/profile-<shape>.json")
    ap.add_argument("--offload-shapes", default="8b",
                    help="shapes that also get a tigon run with checkpointing + CPU offload ('' for none)")
    ap.add_argument("--offload-layers", type=int, default=8,
                    help="layers streamed from host memory in that run (with the embedding on the host)")
    ap.add_argument("--deadline", type=float, default=560.0,
                    help="seconds: variants not started by then are recorded as skipped")
    ap.add_argument("--variant-timeout", type=float, default=300.0)
    ap.add_argument("--child", choices=["prepare", "train"])
    ap.add_argument("--shape")
    ap.add_argument("--system")
    ap.add_argument("--json")
    ap.add_argument("--ckpt", action="store_true", help="(child) activation checkpointing on")
    a = ap.parse_args()
    if a.child:
        a.checkpointing = a.ckpt
        return child_prepare(a) if a.child == "prepare" else child_train(a)

    os.makedirs(a.out, exist_ok=True)
    a.command = os.environ.get("HFC_COMMAND") or " ".join(["python3"] + sys.argv)
    shapes = [s for s in a.shapes.split(",") if s]
    systems = [s for s in a.systems.split(",") if s]
    ckpts = [{"off": False, "on": True}[c] for c in a.checkpointing.split(",") if c]
    for s in shapes:
        if s not in SHAPES:
            sys.exit(f"unknown shape {s}; known: {', '.join(SHAPES)}")
    for s in systems:
        if s not in SYSTEMS:
            sys.exit(f"unknown system {s}; known: {', '.join(SYSTEMS)}")
    if "tigon" in systems and not os.access(a.tigon, os.X_OK):
        sys.exit(f"{a.tigon}: no tigon binary (build it with cargo build --release and copy it there)")
    r = Runner(a)
    rows = []
    partial = os.path.join(a.out, "results.partial.jsonl")
    open(partial, "w").close()
    for shape in shapes:
        print(f"{shape}: preparing", flush=True)
        rc, tail = r.run(f"{shape}-prepare", child_cmd(a, "prepare", shape, []), 400)
        if rc != 0:
            print(f"{shape}: prepare failed ({rc}):\n{tail}")
            continue
        for system in systems:
            for ckpt in ckpts:
                row = run_variant(r, a, shape, system, ckpt)
                rows.append(row)
                with open(partial, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if system == "tigon" and shape in a.offload_shapes.split(",") and True in ckpts:
                row = run_variant(r, a, shape, system, True, offload=True)
                rows.append(row)
                with open(partial, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if a.profile and "tigon" in systems:
            p = paths(a.work, shape)
            r.run(f"{shape}-tigon-profile",
                  [a.tigon, "bench", "train", "--model", p["model"], "--batches", p["batches"],
                   "--adapter", p["adapter"], "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--lr", str(a.lr), "--weight-decay", str(a.weight_decay), "--profile",
                   "--shape", SHAPES[shape]["name"],
                   "--json", os.path.join(a.out, f"profile-{shape}.json")], a.variant_timeout)
    compare_losses(rows)
    compare_offload(rows)
    gpus = {x["gpu"] for x in rows if x.get("gpu")}
    for x in rows:  # rows that never ran still name the machine
        if not x.get("gpu") and len(gpus) == 1:
            x["gpu"] = next(iter(gpus))
    out = os.path.join(a.out, "results.jsonl")
    with open(out + ".tmp", "w") as f:
        for x in rows:
            f.write(json.dumps(x) + "\n")
    os.replace(out + ".tmp", out)
    os.remove(partial)
    print(f"\n{len(rows)} rows in {out}; {time.time() - r.t0:.0f} s in all")
    print_table(rows)
    bad = [x for x in rows if x.get("loss_match") is False or x.get("offload_losses_match") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
