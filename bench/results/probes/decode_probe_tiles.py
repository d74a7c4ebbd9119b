"""Probe 2: router one vs split (fixed selection); decode experts with up/down tiles and slot groups."""
import sys

import torch

from bench.moe_layer import graph_time
from kernels.moe_experts import ExpertWeights, GemvConfig, fused_experts
from kernels.moe_router import RouterSpec, route

torch.manual_seed(0)
L2 = torch.cuda.get_device_properties(0).L2_cache_size
which = sys.argv[1:] or ["router", "experts"]
if "router" in which:
    for E, H, fp32 in [(8, 576, False), (8, 4096, False), (32, 2880, False), (60, 2048, False), (64, 2048, False),
                       (128, 2048, False), (128, 4096, False), (256, 3072, False), (384, 3072, False),
                       (384, 7168, False), (16, 4096, True), (256, 7168, True)]:
        spec = RouterSpec(top_k=min(8, E), fp32_logits=fp32)
        w = torch.randn(E, H, device="cuda", dtype=torch.float32 if fp32 else torch.bfloat16) * 0.02
        line = []
        for T in (1, 4, 16, 64):
            h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            one = graph_time(lambda: route(h, w, spec, split=False), 20) * 1e6
            two = graph_time(lambda: route(h, w, spec, split=True), 20) * 1e6
            line.append(f"T={T}: one {one:.1f} split {two:.1f}")
        print(f"router E={E} H={H} fp32={fp32}: " + " | ".join(line), flush=True)

UPS = [GemvConfig(16, 512, 4), GemvConfig(4, 1024, 4), GemvConfig(2, 1024, 4), GemvConfig(4, 2048, 8),
       GemvConfig(8, 1024, 4), GemvConfig(4, 512, 2)]
DOWNS = [GemvConfig(16, 1024, 8), GemvConfig(8, 1024, 8), GemvConfig(8, 1024, 4), GemvConfig(4, 1024, 4)]
if "experts" in which:
    for name, E, k, H, I in [("qwen3", 128, 8, 2048, 768), ("olmoe", 64, 8, 2048, 1024), ("qwen2", 60, 4, 2048, 1408),
                             ("smollm2", 8, 2, 576, 1536), ("mixtral", 8, 2, 4096, 14336),
                             ("deepseek", 256, 8, 7168, 2048), ("e32k1", 32, 1, 2048, 512),
                             ("gptoss-shape", 32, 4, 2880, 2880), ("kimi-ish", 384, 8, 7168, 2048)]:
        per_call = k * 3 * H * I * 2
        copies = max(1, min(8, -(-3 * L2 // per_call)))
        ws = [ExpertWeights(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02,
                            torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        for T in (1, 4):
            h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]).int()
            tw = torch.rand(T, k, device="cuda")
            floor = (ids.unique().numel() * 3 * H * I * 2) / 4.2e12 * 1e6

            def t(up, dn):
                return graph_time([lambda w=w: fused_experts(h, w, tw, ids, force_path="gemv", gemv=(up, dn))
                                   for w in ws]) * 1e6

            base = t(UPS[0], GemvConfig(16, 1024, 8, groups=1))
            ups = {u: t(u, GemvConfig(16, 1024, 8, groups=1)) for u in UPS}
            bu = min(ups, key=ups.get)
            downs = {(d, g): t(bu, GemvConfig(d.block_n, d.block_k, d.num_warps, groups=g)) for d in DOWNS
                     for g in (1, 2, 4, 8) if g <= k}
            auto = {d: t(bu, d) for d in DOWNS}
            bd = min(downs, key=downs.get)
            print(f"{name} T={T} copies={copies} floor {floor:.1f} us: before {base:.1f} | up "
                  + " ".join(f"n{c.block_n}k{c.block_k}w{c.num_warps}:{v:.1f}" for c, v in ups.items())
                  + " | down " + " ".join(f"n{c.block_n}k{c.block_k}w{c.num_warps}g{g}:{v:.1f}"
                                          for (c, g), v in downs.items())
                  + " | auto " + " ".join(f"n{c.block_n}k{c.block_k}w{c.num_warps}:{v:.1f}" for c, v in auto.items())
                  + f" | best {downs[bd]:.1f} ({bd[0].block_n},{bd[0].block_k},{bd[0].num_warps},g{bd[1]})",
                  flush=True)
        del ws
        torch.cuda.empty_cache()
