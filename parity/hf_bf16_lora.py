#!/usr/bin/env python3
"""HF+PEFT with the base model in bf16 and the LoRA weights ALSO in bf16 (so the LoRA
products run in bf16, as tigon's do today), against HF in fp32, per LoRA gradient, beside
HF's usual bf16 run (base bf16, LoRA fp32). Answers: how much of tigon's bf16 parity error
is the precision of the LoRA path? Run on the GPU machine over fixtures that
`parity/hf_reference.py --models gpu --device cuda --dtype bfloat16` wrote:

    python3 parity/hf_bf16_lora.py $OUT/parity
"""
import json, os, sys, torch
from safetensors.torch import load_file
import transformers
from peft import PeftModel
torch.backends.cuda.matmul.allow_tf32 = False
root = sys.argv[1]
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isfile(os.path.join(d, "batch.json")): continue
    b = json.load(open(os.path.join(d, "batch.json")))
    ids = torch.tensor(b["input_ids"]).cuda(); labels = torch.tensor(b["labels"]).cuda()
    exp = load_file(os.path.join(d, "expected.safetensors"))
    exp16 = load_file(os.path.join(d, "expected_bfloat16.safetensors"))
    cfg = json.load(open(os.path.join(d, "model", "config.json")))
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(os.path.join(d, "model"), torch_dtype=torch.bfloat16, attn_implementation="eager").cuda()
    pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter"), is_trainable=True, autocast_adapter_dtype=False)
    pm = pm.to(torch.bfloat16)
    pm.train()
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    def rel(a, b):
        a = a.double(); b = b.double(); return ((a - b).norm() / b.norm()).item()
    print(f"{name}: HF bf16 base + bf16 LoRA vs fp32: logits {rel(out.logits.float().cpu(), exp['logits']):.2e} loss {rel(out.loss.float().cpu().reshape(1), exp['loss']):.2e}")
    worst = 0
    for n, p in pm.named_parameters():
        if "lora_" in n:
            k = n.replace(".default", "") + ".grad"
            e = rel(p.grad.float().cpu(), exp[k]); e16 = rel(exp16[k], exp[k])
            worst = max(worst, e)
            print(f"   {e:9.2e}  (HF bf16 base + fp32 LoRA {e16:9.2e})  {k}")
    print(f"{name}: worst grad with bf16 LoRA {worst:.2e}")
