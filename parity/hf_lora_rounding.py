#!/usr/bin/env python3
"""Which rounding of the LoRA path costs gradient accuracy? PEFT's LoRA forward is
replaced by one that computes in fp32 (as PEFT does with fp32 adapters over a bf16 base) and
rounds to bf16 only at the points named by a variant, one at a time, as tigon's bf16 path
does: `w` A and B, `xa` the rank-r activation x A^T, `out` the update s (x A^T) B^T before
the add, `dxa` its gradient in the backward, `dx` the adapter's input gradient. For each
fixture it prints the worst LoRA-gradient error against HF in fp32 per variant.

    python3 parity/hf_lora_rounding.py $OUT/parity [more fixture roots]
"""
import json, os, sys, torch
from safetensors.torch import load_file
import transformers, peft
from peft import PeftModel
torch.backends.cuda.matmul.allow_tf32 = False
DEV = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu runs the same emulation on the CPU

class RoundGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): return g.bfloat16().float()

FLAGS = set()
def r(t, flag):
    return t.bfloat16().float() if flag in FLAGS else t

def lora_forward(self, x, *args, **kwargs):
    result = self.base_layer(x, *args, **kwargs)
    A = self.lora_A["default"].weight; B = self.lora_B["default"].weight; s = self.scaling["default"]
    xf = x.float()
    if "dx" in FLAGS: xf = RoundGrad.apply(xf)
    xa = xf @ r(A, "w").t()
    xa = r(xa, "xa")
    if "dxa" in FLAGS: xa = RoundGrad.apply(xa)
    d = (xa @ r(B, "w").t()) * s
    d = r(d, "out")
    return (result.float() + d).to(result.dtype)

peft.tuners.lora.layer.Linear.forward = lora_forward

def rel(a, b):
    a = a.double(); b = b.double(); return ((a - b).norm() / b.norm()).item()

variants = [(), ("w",), ("xa",), ("out",), ("dxa",), ("dx",), ("w", "xa"), ("w", "xa", "out", "dxa", "dx")]
for root in sys.argv[1:]:
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isfile(os.path.join(d, "batch.json")): continue
        b = json.load(open(os.path.join(d, "batch.json")))
        ids = torch.tensor(b["input_ids"]).to(DEV); labels = torch.tensor(b["labels"]).to(DEV)
        exp = load_file(os.path.join(d, "expected.safetensors"))
        cfg = json.load(open(os.path.join(d, "model", "config.json")))
        cls = getattr(transformers, cfg["architectures"][0])
        line = []
        for v in variants:
            FLAGS.clear(); FLAGS.update(v)
            model = cls.from_pretrained(os.path.join(d, "model"), torch_dtype=torch.bfloat16, attn_implementation="eager").to(DEV)
            pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter"), is_trainable=True)
            for n, p in pm.named_parameters():
                if "lora_" in n: p.data = p.data.float()
            pm.train()
            out = pm(input_ids=ids, labels=labels); out.loss.backward()
            worst = max(rel(p.grad.float().cpu(), exp[n.replace(".default", "") + ".grad"])
                        for n, p in pm.named_parameters() if "lora_" in n)
            line.append(f"{'+'.join(v) or 'fp32':>16s} {worst:.2e}")
        print(f"{root.split('/')[-1]:10s} {name:10s} " + " ".join(line), flush=True)
