"""GPU probe: which of our norm / rotary kernels moves a tiny bf16 GPT-OSS / Mixtral away from its own forward,
and the host time of one rotary launch for q and k against two."""
import time

import torch

from bench.common import bench
from kernels import hf_norms, hf_rotary
from kernels.hf_moe import enable_fused_moe
from kernels.rotary import rotary, rotary_pair
from tests.test_hf_moe import _model

for name in ("gpt_oss", "mixtral", "qwen3_moe"):
    for dtype in (torch.float32, torch.bfloat16):
        ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).cuda()
        res = {}
        for norms, rot in ((False, False), (True, False), (False, True), (True, True)):
            model = _model(name, dtype)
            model.set_experts_implementation("eager")
            with torch.no_grad():
                ref = model(input_ids=ids).logits.double()
            hf_rotary.uninstall_fused_rotary()
            enable_fused_moe(model, norms=norms, rotary=rot)
            with torch.no_grad():
                model(input_ids=ids)
                out = model(input_ids=ids).logits.double()
            res[f"norms={norms} rotary={rot}"] = f"{((out - ref).norm() / ref.norm()).item():.2e}"
            hf_rotary.uninstall_fused_rotary()
        print(name, dtype, res, flush=True)

# Rotary alone on the tiny GPT-OSS shapes: bf16 kernel against the file's own function.
from transformers.models.gpt_oss import modeling_gpt_oss as g
q = torch.randn(2, 11, 4, 12, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(2, 11, 2, 12, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
pos = torch.arange(11, device="cuda")[None].expand(2, -1).float()[..., None] * torch.linspace(0.01, 1, 6, device="cuda")
cos, sin = (pos.cos() * 1.3).to(torch.bfloat16), (pos.sin() * 1.3).to(torch.bfloat16)
ref = g.apply_rotary_pos_emb(q, k, cos, sin)
ours = rotary_pair(q, k, cos, sin, True)
for a, b in zip(ours, ref):
    print("gpt-oss rotary bf16 rel err", ((a.double() - b.double()).norm() / b.double().norm()).item())

for t in (16, 4096):
    bsz = 16 if t >= 2048 else 1
    q = torch.randn(bsz, t // bsz, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(bsz, t // bsz, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = (torch.randn(bsz, t // bsz, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for label, fn in (("pair", lambda: rotary_pair(q, k, cos, sin)),
                      ("two", lambda: (rotary(q, cos, sin), rotary(k, cos, sin)))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200
        torch.cuda.synchronize()
        print(f"T={t} {label}: host {host * 1e6:.1f} us/call, event time {bench(fn, reps=50) * 1e6:.1f} us", flush=True)
from kernels.launch import fast
from kernels.rotary import _rotary_kernel
print("fast hits", fast(_rotary_kernel).hits, "entries", len(fast(_rotary_kernel).compiled))
