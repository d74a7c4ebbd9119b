"""GPU probe: the tiny GPT-OSS experts module (bf16) alone, ours forced against its own eager forward in bf16 and
in float64, at 22 and 3 tokens, with the test's clamp (0.4) and with a clamp that never bites (100)."""
import copy
import os

import torch

from kernels import hf_coverage as coverage
from kernels.hf_moe import enable_fused_moe
from kernels.moe_experts import fused_experts
from tests.test_hf_moe import _model

os.environ["DISTILL_MOE_DISPATCH"] = "fused"
model = _model("gpt_oss", torch.bfloat16)
ex = model.model.layers[0].mlp.experts
enable_fused_moe(model, norms=False, rotary=False)


def rel(a, b):
    return f"{((a.double() - b.double()).norm() / b.double().norm()).item():.2e}"


gen = torch.Generator().manual_seed(0)
for limit in (0.4, 100.0):
    ex.limit = limit
    ex64 = copy.deepcopy(ex).double()
    for T in (22, 3):
        x = torch.randn(T, 48, generator=gen).cuda().bfloat16()
        idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)]).cuda()
        w = torch.rand(T, 2, generator=gen).cuda().bfloat16()
        with torch.no_grad():
            from transformers.integrations import moe as hf
            got = coverage.verdict(ex, x)
            weights = coverage.expert_weights(ex, got)
            act, alpha, lim = got[3]
            ours = fused_experts(x, weights, w, idx, activation=act, swiglu_alpha=alpha, swiglu_limit=lim)
            print(f"limit {limit} T={T}: act {act} alpha {alpha} limit {lim} transposed {weights.transposed} "
                  f"concatenated {weights.concatenated}", flush=True)
            for name, fn in (("grouped_mm", hf.grouped_mm_experts_forward), ("batched_mm", hf.batched_mm_experts_forward)):
                s = fn(ex, x, idx, w)
                print(f"   {name} vs ours {rel(ours, s)}", flush=True)
            try:
                s64 = hf.batched_mm_experts_forward(ex64, x.double(), idx, w.double())
                print(f"   float64 batched_mm: ours {rel(ours, s64)}, bf16 batched_mm {rel(hf.batched_mm_experts_forward(ex, x, idx, w), s64)}", flush=True)
            except Exception as e:  # noqa: BLE001
                print("   float64 failed", type(e).__name__, str(e)[:200])
            for path in ("grouped", "gemv"):
                if path == "gemv" and T > 4:
                    continue
                o = fused_experts(x, weights, w, idx, activation=act, swiglu_alpha=alpha, swiglu_limit=lim, force_path=path)
                print(f"   ours {path} vs bf16 batched_mm {rel(o, hf.batched_mm_experts_forward(ex, x, idx, w))}", flush=True)
            o32 = fused_experts(x.float(), coverage.expert_weights(copy.deepcopy(ex).float(), got), w.float(), idx,
                                activation=act, swiglu_alpha=alpha, swiglu_limit=lim)
            print(f"   ours float32 vs bf16 batched_mm {rel(o32, hf.batched_mm_experts_forward(ex, x, idx, w))}", flush=True)
