#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers + PEFT for tigon's parity tests.

For each tiny model (random weights, fixed seed) this writes a folder with:
  model/      config.json + model.safetensors, as transformers saves them
  adapter/    adapter_config.json + adapter_model.safetensors, as PEFT saves them
              (lora_B is random, not zero, so every gradient is non-trivial)
  batch.json  input_ids and HF-style labels ([batch][seq], -100 = ignored)
  expected.safetensors  logits [batch, seq, vocab], loss [1], and the gradient of every
              LoRA tensor under its PEFT key name with a `.grad` suffix

The fixtures are small (a few hundred KB each) and committed, so `cargo test` checks tigon's
CPU path without torch. Re-run this on a machine with torch to regenerate them, or with
--device cuda --dtype bfloat16 to produce the bf16 GPU reference.

    python3 parity/hf_reference.py --out parity/fixtures
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

TINY = {
    # Llama-3 style: GQA, llama3 rope scaling, untied head.
    "tiny_llama": dict(
        arch="LlamaForCausalLM",
        config=dict(
            hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64),
            tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
            bos_token_id=1, eos_token_id=2),
        lora=dict(r=8, lora_alpha=16, target_modules="all-linear"),
    ),
    # Qwen2 style: q/k/v biases, tied embeddings, rank/alpha patterns and rsLoRA.
    "tiny_qwen2": dict(
        arch="Qwen2ForCausalLM",
        config=dict(
            hidden_size=48, intermediate_size=136, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, vocab_size=300,
            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
            tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
            bos_token_id=1, eos_token_id=2),
        lora=dict(r=8, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                  "gate_proj", "up_proj", "down_proj"],
                  rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 8}),
    ),
}


def build(name, spec, out, device, dtype, seed):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg_cls = getattr(transformers, spec["arch"].replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, spec["arch"])
    config = cfg_cls(**spec["config"])
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32)
    # Random norm weights (HF initialises them to 1, which would hide a missing weight).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    root = os.path.join(out, name)
    model.save_pretrained(os.path.join(root, "model"), safe_serialization=True)

    lcfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **spec["lora"])
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(os.path.join(root, "adapter"))

    batch, seq = 2, 23
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[1, 10:13] = -100

    peft_model = peft_model.to(device=device, dtype=dtype)
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    peft_model.train()
    out_ = peft_model(input_ids=input_ids.to(device), labels=labels.to(device))
    out_.loss.backward()

    tensors = {
        "logits": out_.logits.detach().float().cpu().contiguous(),
        "loss": out_.loss.detach().float().cpu().reshape(1),
    }
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            key = n.replace(".default", "")
            tensors[key + ".grad"] = p.grad.detach().float().cpu().contiguous()
    suffix = "" if dtype == torch.float32 else "_" + str(dtype).replace("torch.", "")
    save_file(tensors, os.path.join(root, f"expected{suffix}.safetensors"))
    with open(os.path.join(root, "batch.json"), "w") as f:
        json.dump({"input_ids": input_ids.tolist(), "labels": labels.tolist()}, f)
    print(f"{name}: loss {out_.loss.item():.6f}, {len(tensors) - 2} LoRA gradients")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="parity/fixtures")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    for name, spec in TINY.items():
        if a.only and name not in a.only.split(","):
            continue
        build(name, spec, a.out, a.device, getattr(torch, a.dtype), a.seed)


if __name__ == "__main__":
    main()
