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
CPU path without torch. Re-run this on a machine with torch to regenerate them:

    python3 parity/hf_reference.py --out parity/fixtures

GPU fixtures (`--models gpu`: head_dim 64 and 128, which tigon's CUDA attention supports;
the tiny ones use 16 and 8) are written on the GPU machine, not committed:

    python3 parity/hf_reference.py --models gpu --device cuda --dtype bfloat16 --out $OUT/parity
    tigon parity --fixtures $OUT/parity --device cuda

With a dtype other than float32, every base weight is first rounded to that dtype (stored as
f32 values that are exact in it), so HF and tigon compute from identical weights, and two
references are written: expected.safetensors (HF in fp32, TF32 off) and
expected_<dtype>.safetensors (HF with the base model in that dtype, LoRA in fp32 as PEFT
training keeps it). `tigon parity --device cuda` holds tigon-bf16 to the fp32 one (see
crates/cli/src/parity_cmd.rs for why) and prints HF-bf16's own distance from it for scale.
"""
import argparse
import copy
import json
import os

# cuBLAS needs this for deterministic algorithms on CUDA; set before torch starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

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

# Small models at head dims the CUDA attention kernels take (64 and 128), sequences of 100
# tokens (not a multiple of any tile), for `tigon parity --device cuda`.
GPU = {
    "gpu_llama": dict(
        arch="LlamaForCausalLM",
        config=dict(
            hidden_size=256, intermediate_size=704, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
            max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64),
            tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
            bos_token_id=1, eos_token_id=2),
        lora=dict(r=16, lora_alpha=32, target_modules="all-linear"),
        seq=100,
    ),
    # head_dim 128 = hidden / heads, GQA 2:1, biases, tied embeddings, rsLoRA and patterns.
    "gpu_qwen2": dict(
        arch="Qwen2ForCausalLM",
        config=dict(
            hidden_size=256, intermediate_size=576, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=448,
            max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
            tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
            bos_token_id=1, eos_token_id=2),
        lora=dict(r=8, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                  "gate_proj", "up_proj", "down_proj"],
                  rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 8}),
        seq=100,
    ),
}


def reference(peft_model, input_ids, labels, device, dtype):
    """HF+PEFT logits, loss and LoRA gradients, base model in `dtype`, LoRA in fp32."""
    # The LoRA weights keep their exact fp32 values (a round trip through `dtype` would
    # change them from what the adapter folder holds).
    lora = {n: p.data.float().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    peft_model = peft_model.to(device=device, dtype=dtype)
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data = lora[n].to(device)
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
    return tensors


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
    if dtype != torch.float32:
        # Weights exactly representable in `dtype`: HF and tigon then start from the same
        # numbers, and the fp32 reference is the exact answer for them.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    root = os.path.join(out, name)
    model.save_pretrained(os.path.join(root, "model"), safe_serialization=True)

    lcfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **spec["lora"])
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(os.path.join(root, "adapter"))

    batch, seq = 2, spec.get("seq", 23)
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[1, 10:13] = -100

    dtypes = [torch.float32] if dtype == torch.float32 else [torch.float32, dtype]
    for dt in dtypes:
        model_copy = peft_model if len(dtypes) == 1 else copy.deepcopy(peft_model)
        tensors = reference(model_copy, input_ids, labels, device, dt)
        suffix = "" if dt == torch.float32 else "_" + str(dt).replace("torch.", "")
        save_file(tensors, os.path.join(root, f"expected{suffix}.safetensors"))
        print(f"{name} ({device}, {dt}): loss {tensors['loss'].item():.6f}, "
              f"{len(tensors) - 2} LoRA gradients")
    with open(os.path.join(root, "batch.json"), "w") as f:
        json.dump({"input_ids": input_ids.tolist(), "labels": labels.tolist()}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="parity/fixtures")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", default=None)
    ap.add_argument("--models", choices=["tiny", "gpu", "all"], default="tiny",
                    help="tiny: the committed CPU fixtures; gpu: head_dim 64/128 models")
    a = ap.parse_args()
    # warn_only: a CUDA op without a deterministic kernel warns instead of failing the run.
    torch.use_deterministic_algorithms(True, warn_only=a.device != "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = {"tiny": TINY, "gpu": GPU, "all": {**TINY, **GPU}}[a.models]
    for name, spec in models.items():
        if a.only and name not in a.only.split(","):
            continue
        build(name, spec, a.out, a.device, getattr(torch, a.dtype), a.seed)


if __name__ == "__main__":
    main()
