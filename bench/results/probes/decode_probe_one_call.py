"""Decode probe: graph launch overhead; router one-kernel vs split; gate/up vs down GEMV alone (amortised graphs)."""
import statistics
import sys

import torch

from kernels.launch import cdiv, fast
from kernels.moe_experts import GEMV_TILES, ExpertWeights, GemvConfig, fused_experts
from kernels.moe_gemv import down_gemv_kernel, gate_up_gemv_kernel
from kernels.moe_router import RouterSpec, route

torch.manual_seed(0)
L2 = torch.cuda.get_device_properties(0).L2_cache_size


def replay_us(g, reps=30):
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def gtime(fns, rounds):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(rounds):
            for f in fns:
                f()
    return replay_us(g) / (rounds * len(fns))


x = torch.zeros(16, device="cuda")
print(f"L2 {L2 / 2**20:.0f} MiB; tiny kernel: graph of 1 call {gtime([lambda: x.add_(1)], 1):.2f} us, "
      f"of 40 calls {gtime([lambda: x.add_(1)], 40):.2f} us/call", flush=True)

which = sys.argv[1:] or ["router", "experts"]
if "router" in which:
    for E, H, fp32 in [(8, 576, False), (8, 4096, False), (32, 2880, False), (60, 2048, False), (64, 2048, False),
                       (128, 2048, False), (128, 4096, False), (256, 3072, False), (384, 3072, False),
                       (16, 4096, True), (256, 7168, True)]:
        spec = RouterSpec(top_k=min(8, E), fp32_logits=fp32)
        w = torch.randn(E, H, device="cuda", dtype=torch.float32 if fp32 else torch.bfloat16) * 0.02
        line = []
        for T in (1, 4, 16, 64):
            h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            one = gtime([lambda: route(h, w, spec, split=False)], 20)
            two = gtime([lambda: route(h, w, spec, split=True)], 20)
            single = gtime([lambda: route(h, w, spec, split=False)], 1)
            line.append(f"T={T}: one {one:.1f} split {two:.1f} (one, graph of 1: {single:.1f})")
        print(f"router E={E} H={H} fp32={fp32}: " + " | ".join(line), flush=True)

if "experts" in which:
    for name, E, k, H, I in [("qwen3", 128, 8, 2048, 768), ("olmoe", 64, 8, 2048, 1024), ("qwen2", 60, 4, 2048, 1408),
                             ("smollm2", 8, 2, 576, 1536), ("mixtral", 8, 2, 4096, 14336),
                             ("deepseek", 256, 8, 7168, 2048), ("e32k1", 32, 1, 2048, 512),
                             ("gptoss-shape", 32, 4, 2880, 2880)]:
        per_call = k * 3 * H * I * 2
        copies = max(1, min(8, -(-3 * L2 // per_call)))
        ws = [ExpertWeights(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02,
                            torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        for T in (1, 4):
            h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]).int()
            tw = torch.rand(T, k, device="cuda")
            floor = (ids.unique().numel() * 3 * H * I * 2) / 4.2e12 * 1e6
            gu, gd = GEMV_TILES
            inters = [torch.empty(T * k, I, device="cuda", dtype=torch.bfloat16) for _ in ws]
            outs = [torch.empty(T, H, device="cuda", dtype=torch.bfloat16) for _ in ws]

            def up(i, c=gu):
                wt = ws[i]
                g_se, g_sn, g_sk, go, uo, rm = wt.gate_up_strides()
                fast(gate_up_gemv_kernel)[(T * k, cdiv(I, c.block_n))](
                    h, wt.gate_up, ids, inters[i], H, I, h.stride(0), g_se, g_sn, g_sk, inters[i].stride(0),
                    go, uo, rm, None, 0, 0, 1.0, 7.0, None, None, 0, 0, 0, None, 0,
                    TOP_K=k, ACT=0, HAS_BIAS=False, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps)

            def down(i, c=gd):
                wt = ws[i]
                d_se, d_sn, d_sk = wt.down_strides()
                fast(down_gemv_kernel)[(T, cdiv(H, c.block_n))](
                    inters[i], wt.down, ids, tw, outs[i], I, H, inters[i].stride(0), d_se, d_sn, d_sk,
                    outs[i].stride(0), None, 0, 0, None, 0, 0, 0,
                    TOP_K=k, HAS_BIAS=False, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps)

            rng = range(copies)
            t_up = gtime([lambda i=i: up(i) for i in rng], 4)
            t_dn = gtime([lambda i=i: down(i) for i in rng], 4)
            t_all = gtime([lambda i=i: fused_experts(h, ws[i], tw, ids) for i in rng], 4)
            t_one = gtime([lambda: fused_experts(h, ws[0], tw, ids)], 1)
            dn_var = {c: gtime([lambda i=i, c=c: down(i, c) for i in rng], 4)
                      for c in (GemvConfig(8, 1024, 8), GemvConfig(4, 1024, 4), GemvConfig(16, 512, 8),
                                GemvConfig(32, 256, 8), GemvConfig(8, 512, 4))}
            up_var = {c: gtime([lambda i=i, c=c: up(i, c) for i in rng], 4)
                      for c in (GemvConfig(8, 512, 4), GemvConfig(4, 512, 4), GemvConfig(16, 256, 4),
                                GemvConfig(8, 1024, 8), GemvConfig(4, 1024, 4))}
            print(f"{name} T={T} copies={copies} floor {floor:.1f} us: up {t_up:.1f} (floor {floor * 2 / 3:.1f}) "
                  f"down {t_dn:.1f} (floor {floor / 3:.1f}) experts {t_all:.1f} | one-call graph {t_one:.1f} | "
                  "down " + " ".join(f"n{c.block_n}k{c.block_k}w{c.num_warps}:{t:.1f}" for c, t in dn_var.items())
                  + " | up " + " ".join(f"n{c.block_n}k{c.block_k}w{c.num_warps}:{t:.1f}" for c, t in up_var.items()),
                  flush=True)
        del ws
        torch.cuda.empty_cache()
