#!/usr/bin/env python3
"""Three-way kernel table: PyTorch eager and Liger-Kernel (bench/torch_kernels.py) against
tigon's fused kernels and their unfused composition (`tigon bench kernels --json`), all
measured in the same GPU call.

    python3 bench/compare_kernels.py tigon.json torch.json [--markdown out.md]

Each row: forward + backward median time and peak extra device memory per system, tigon's
achieved fraction of its ceiling (copy bandwidth for memory-bound ops, GEMM rate for
GEMM-bound ones), and tigon fused's speed-up over Liger.
"""
import argparse
import json

# tigon bench op name -> torch_kernels.py op name (the same shapes)
SAME = {
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "swiglu": "swiglu",
    "geglu": "geglu",
    "rope": "rope",
    "cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
}


def load(path):
    with open(path) as f:
        return json.load(f)


def cell(ms, mib):
    if ms is None:
        return "-"
    return f"{ms:.3f} ms, {mib:.0f} MiB" if mib is not None else f"{ms:.3f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tigon")
    ap.add_argument("torch")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    t = load(a.tigon)
    p = load(a.torch)
    torch_rows = {(r["op"], r["system"]): r for r in p.get("rows", [])}
    lines = [
        f"GPU: {t.get('gpu')}; copy {t.get('copy_gbps', 0):.0f} GB/s, bf16 GEMM "
        f"{t.get('gemm_tflops', 0):.0f} TFLOP/s (tigon's measurement); torch {p.get('torch')}, "
        f"liger {p.get('liger')}",
        "",
        "| op | shape | torch eager | Liger-Kernel | tigon unfused | tigon fused | of ceiling | vs Liger |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_op = {}
    for r in t["rows"]:
        by_op.setdefault(r["op"], {})[r["variant"]] = r
    for op, variants in by_op.items():
        fused = variants.get("fused")
        unfused = variants.get("unfused")
        shape = (fused or unfused or {}).get("shape", "")
        torch_op = SAME.get(op)
        tr = torch_rows.get((torch_op, "torch"), {})
        lr = torch_rows.get((torch_op, "liger"), {})
        speed = "-"
        if fused and lr.get("ms_fwd_bwd"):
            speed = f"{lr['ms_fwd_bwd'] / fused['median_ms']:.2f}x"
        frac = f"{100 * fused['frac_of_ceiling']:.0f}%" if fused else "-"
        lines.append(
            f"| {op} | {shape} | {cell(tr.get('ms_fwd_bwd'), tr.get('peak_extra_mib'))} | "
            f"{cell(lr.get('ms_fwd_bwd'), lr.get('peak_extra_mib'))} | "
            f"{cell(unfused and unfused['median_ms'], unfused and unfused['peak_extra_mib'])} | "
            f"{cell(fused and fused['median_ms'], fused and fused['peak_extra_mib'])} | {frac} | {speed} |"
        )
        for name, r in variants.items():
            if name not in ("fused", "unfused"):
                lines.append(
                    f"| {op} ({name}) | {r['shape']} | | | | {cell(r['median_ms'], r['peak_extra_mib'])} | "
                    f"{100 * r['frac_of_ceiling']:.0f}% | |"
                )
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        with open(a.markdown + ".tmp", "w") as f:
            f.write(text + "\n")
        import os
        os.replace(a.markdown + ".tmp", a.markdown)


if __name__ == "__main__":
    main()
