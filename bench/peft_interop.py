"""Check tigon-model's files against transformers + PEFT.

Input: the folders written by `cargo run -p tigon-model --example peft_fixture -- FIXTURE`
(per architecture: base/, adapter/ made by tigon, merged/ exported by tigon).

For each architecture this
  1. loads base/ with transformers (no missing or unexpected keys),
  2. loads tigon's adapter with PeftModel.from_pretrained and checks every lora_A/lora_B
     parameter equals the file (so PEFT found every key, with the shapes it expects),
  3. compares logits of PEFT (base + adapter, unmerged, fp32) with tigon's merged export
     (bf16 weights) loaded by transformers,
  4. compares tigon's merged weights with PEFT's merge_and_unload() rounded to bf16,
  5. writes a PEFT-made adapter and PEFT's fp32 merge of it into OUT for the reverse check
     (tigon loading a PEFT adapter), done on the CPU machine.

    python bench/peft_interop.py FIXTURE OUT

The fixture must travel with the checkout to the GPU machine (it is not committed):
generate it inside the repository, e.g. into ./interop_fixture, before `run`. Step 5's
output is checked with `cargo run --release -p tigon-engine --example peft_check -- FIXTURE OUT`. Written for
transformers 5.x (`dtype=`) and PEFT 0.21.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def bf16_ulps(ours, ref, base):
    """Max distance of `ours` (bf16 values) from `ref` rounded to bf16, in bf16 ulps of the
    larger of ref and the pre-merge weight `base`. Both merges sum W and s B A in fp32 in
    different orders, so where the two nearly cancel the results differ by a few fp32 ulps
    of W, which can be several bf16 ulps of the tiny result; measured against W's magnitude
    that is still under one."""
    r = ref.to(torch.bfloat16).float()
    diff = (ours.float() - r).abs()
    mag = torch.maximum(r.abs(), base.float().abs()).clamp_min(1e-30)
    ulp = torch.ldexp(torch.ones_like(r), torch.frexp(mag).exponent - 8)
    return (diff / ulp).max().item()


def main(fixture, out):
    torch.manual_seed(0)
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    ok = True
    for tag in sorted(os.listdir(fixture)):
        d = os.path.join(fixture, tag)
        r = {}
        base, info = AutoModelForCausalLM.from_pretrained(
            os.path.join(d, "base"), dtype=torch.float32, output_loading_info=True
        )
        r["base_missing"] = list(info["missing_keys"])
        r["base_unexpected"] = list(info["unexpected_keys"])
        ids = torch.randint(0, base.config.vocab_size, (2, 17))
        with torch.no_grad():
            base_logits = base(ids).logits

        # merge_and_unload below changes these in place: keep the pre-merge weights.
        base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
        model = PeftModel.from_pretrained(base, os.path.join(d, "adapter"))
        file = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
        seen, max_param_diff = 0, 0.0
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                key = name.replace(".default.", ".")
                max_param_diff = max(max_param_diff, (p.detach() - file[key]).abs().max().item())
                seen += 1
        r["lora_params_loaded"] = seen
        r["lora_tensors_in_file"] = len(file)
        r["lora_max_param_diff"] = max_param_diff
        with torch.no_grad():
            peft_logits = model(ids).logits

        merged, info = AutoModelForCausalLM.from_pretrained(
            os.path.join(d, "merged"), dtype=torch.float32, output_loading_info=True
        )
        r["merged_missing"] = list(info["missing_keys"])
        r["merged_unexpected"] = list(info["unexpected_keys"])
        with torch.no_grad():
            ours_logits = merged(ids).logits
        r["logits_rel_err_merged_vs_peft"] = rel(ours_logits, peft_logits)
        r["logits_rel_change_from_adapter"] = rel(peft_logits, base_logits)

        peft_merged = model.merge_and_unload().state_dict()
        ours_sd = load_file(os.path.join(d, "merged", "model.safetensors"))
        worst = 0.0
        for k, v in ours_sd.items():
            worst = max(worst, bf16_ulps(v, peft_merged[k], base_sd.get(k, peft_merged[k])))
        r["merged_weights_max_bf16_ulps_vs_peft"] = worst

        # Reverse direction: a PEFT-made adapter and PEFT's fp32 merge of it.
        fresh = AutoModelForCausalLM.from_pretrained(
            os.path.join(d, "base"), dtype=torch.float32
        )
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            init_lora_weights=False,
            rank_pattern={"o_proj": 2},
            alpha_pattern={"layers.1.mlp.down_proj": 3.0},
            use_rslora=(tag == "qwen3"),
            task_type="CAUSAL_LM",
        )
        pm = get_peft_model(fresh, cfg)
        pdir = os.path.join(out, tag, "peft_adapter")
        pm.save_pretrained(pdir)
        with torch.no_grad():
            plog = pm(ids).logits
        merged_sd = {k: v.contiguous() for k, v in pm.merge_and_unload().state_dict().items()
                     if k.endswith("_proj.weight")}
        save_file(merged_sd, os.path.join(out, tag, "peft_merged_f32.safetensors"))
        save_file({"ids": ids.to(torch.int32), "logits": plog.contiguous()},
                  os.path.join(out, tag, "peft_logits.safetensors"))

        good = (
            not r["base_missing"] and not r["base_unexpected"]
            and not r["merged_missing"] and not r["merged_unexpected"]
            and r["lora_params_loaded"] == r["lora_tensors_in_file"]
            and r["lora_max_param_diff"] == 0.0
            and r["logits_rel_err_merged_vs_peft"] < 2e-2
            and r["logits_rel_change_from_adapter"] > 1e-2
            and r["merged_weights_max_bf16_ulps_vs_peft"] <= 1.0
        )
        r["ok"] = good
        ok &= good
        report[tag] = r
    report["ok"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
