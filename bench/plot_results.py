#!/usr/bin/env python3
"""Tables and a plot from the LoRA training comparison (bench/hf_compare.py).

    python3 bench/plot_results.py [FILES...] [--png bench/results/train.png] [--markdown FILE]

Reads JSON lines (default: bench/results/*.jsonl), keeps for each (GPU, shape) the rows of
the most recent run (latest date, then the file read last), and writes:
  * a markdown table per shape: tokens/s, the ratio to HF+PEFT with the same checkpointing,
    peak memory, MFU, and the largest loss difference from HF+PEFT over the steps;
  * a PNG with two panels, tokens/s and peak GiB per variant, one group of bars per shape
    (needs matplotlib; without it the tables are still written and the script says so).
"""

import argparse
import glob
import json
import os
import sys

ORDER = ["hf-peft", "hf-peft-liger", "tigon"]


def load(files):
    rows = []
    for i, path in enumerate(files):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not JSON: {e}")
                for k in ("system", "shape", "checkpointing"):
                    if k not in r:
                        sys.exit(f"{path}:{n}: no `{k}`")
                r["_file"], r["_order"] = path, i
                rows.append(r)
    return rows


def latest(rows):
    """For each (gpu, shape), the rows of the newest run: latest date, then latest file."""
    best = {}
    for r in rows:
        key = (r.get("gpu"), r["shape"])
        rank = (r.get("date") or "", r["_order"])
        if key not in best or rank > best[key]:
            best[key] = rank
    return [r for r in rows if (r.get("date") or "", r["_order"]) == best[(r.get("gpu"), r["shape"])]]


def label(r):
    """The system's name; tigon rows with CPU offload (an `offload` object) are their own
    variant, "tigon (ckpt+offload)"."""
    if r["system"] == "tigon" and r.get("offload"):
        return "tigon (ckpt+offload)" if r["checkpointing"] else "tigon (offload)"
    return r["system"]


def variant(r):
    return f"{label(r)} ckpt {'on' if r['checkpointing'] else 'off'}"


def sort_key(r):
    """Shapes in the order the runs wrote them, then checkpointing off/on, then system
    (offload rows after plain tigon)."""
    s = ORDER.index(r["system"]) if r["system"] in ORDER else len(ORDER)
    return (r["_shape_order"], r["checkpointing"], s, bool(r.get("offload")))


def offload_note(r):
    """What an offload row kept on the host, for the table."""
    o = r.get("offload") or {}
    parts = []
    if o.get("embedding_on_host"):
        parts.append("embedding")
    if o.get("layers"):
        parts.append(f"{o['layers']} streamed layers")
    return ", ".join(parts) or "nothing"


def markdown(rows):
    out = []
    groups = {}
    for r in sorted(rows, key=sort_key):
        groups.setdefault((r.get("gpu"), r["shape"]), []).append(r)
    for (gpu, shape), rs in groups.items():
        r0 = rs[0]
        out.append(f"**{shape}**, batch {r0.get('batch')} x seq {r0.get('seq')}, {gpu}, "
                   f"{r0.get('date')}, {r0.get('steps')} timed steps after {r0.get('warmup')} "
                   f"warm-up, LoRA r {r0.get('lora_r')} alpha {r0.get('lora_alpha')}, "
                   f"AdamW lr {r0.get('lr')}")
        if r0.get("command"):
            out.append(f"\n`{r0['command']}`")
        out.append("")
        out.append("| system | checkpointing | tokens/s | x HF+PEFT | peak GiB | MFU | max abs loss diff vs HF+PEFT |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        hf = {x["checkpointing"]: x.get("tok_s") for x in rs
              if x["system"] == "hf-peft" and x.get("status") == "ok"}
        for r in rs:
            ck = "on" if r["checkpointing"] else "off"
            if r.get("status") != "ok":
                out.append(f"| {label(r)} | {ck} | {r.get('status', 'error')} | | | | |")
                continue
            base = hf.get(r["checkpointing"])
            ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
            d = r.get("loss_maxdiff_vs_hf")
            dl = "-" if d is None else f"{d:.1e}" + ("" if r.get("loss_match", True) else " (over tolerance)")
            out.append(f"| {label(r)} | {ck} | {r['tok_s']:,.0f} | {ratio} | "
                       f"{r['peak_gib']:.1f} | {100 * r['mfu']:.1f}% | {dl} |")
        for r in rs:
            if r.get("offload"):
                rel = r.get("offload_loss_maxrel_vs_tigon")
                out.append(f"\n{label(r)}: on the host: {offload_note(r)}"
                           + ("" if rel is None else
                              f"; losses within {rel:.1e} relative of tigon without offload"))
        out.append("")
    return "\n".join(out)


def plot(rows, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (the tables are)")
        return False
    rows = sorted(rows, key=sort_key)
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    variants = []
    for r in rows:
        if variant(r) not in variants:
            variants.append(variant(r))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(variants))
    colors = {"hf-peft": "#7f7f7f", "hf-peft-liger": "#1f77b4", "tigon": "#d62728",
              "tigon (ckpt+offload)": "#ff7f0e", "tigon (offload)": "#ff7f0e"}
    for ax, key, label in ((axes[0], "tok_s", "tokens/s"), (axes[1], "peak_gib", "peak device memory (GiB)")):
        for j, v in enumerate(variants):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                m = [r for r in rows if r["shape"] == s and variant(r) == v]
                x = i + (j - (len(variants) - 1) / 2) * width
                if m and m[0].get("status") == "ok":
                    xs.append(x)
                    ys.append(m[0][key])
                elif m:
                    ax.text(x, 0, m[0].get("status", "error").upper(), rotation=90,
                            ha="center", va="bottom", fontsize=7)
            system = v.split(" ckpt ")[0]
            ax.bar(xs, ys, width, label=v, color=colors.get(system, "#2ca02c"),
                   alpha=0.55 if v.endswith("on") else 1.0,
                   hatch="//" if v.endswith("on") else None, edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    gpus = sorted({r.get("gpu") or "?" for r in rows})
    dates = sorted({r.get("date") or "?" for r in rows})
    fig.suptitle(f"LoRA training, {', '.join(gpus)}, {', '.join(dates)} (hatched: activation checkpointing)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, png)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", help="JSON-lines files (default: bench/results/*.jsonl)")
    ap.add_argument("--png", default="bench/results/train.png")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--all", action="store_true", help="every row, not only the latest run per GPU and shape")
    a = ap.parse_args()
    files = a.files or sorted(glob.glob("bench/results/*.jsonl"))
    if not files:
        sys.exit("no results: pass JSON-lines files or put them in bench/results/")
    rows = load(files)
    first = {}
    for r in rows:
        first.setdefault(r["shape"], len(first))
    for r in rows:
        r["_shape_order"] = first[r["shape"]]
    if not a.all:
        rows = latest(rows)
    md = markdown(rows)
    print(md)
    if a.markdown:
        with open(a.markdown + ".tmp", "w") as f:
            f.write(md + "\n")
        os.replace(a.markdown + ".tmp", a.markdown)
    if plot(rows, a.png):
        print(f"plot: {a.png}")


if __name__ == "__main__":
    main()
