"""Where our MoE block's time goes at prefill sizes, and which grouped-GEMM data path and tiles are fastest.

    python -m bench.moe_gemm [--out bench/results/moe_gemm.csv] [--shapes ...] [--tokens 4096 16384]

For each layer shape of bench.moe_layer (same random weights, same skewed routing) and each T, in one GPU run:
- parts of our block, each timed alone: the router, the alignment, the gate/up GEMM, the down GEMM (with its sum
  over k), and the same split of the stock block (its router; `grouped_mm` experts alone);
- what the GEMMs could reach: cuBLAS on a dense matmul of the same FLOPs ([T*k, H] x [H, 2I] and
  [T*k, I] x [I, H]), the rate a grouped GEMM would get with no routing, gather or padding;
- the block as a CUDA-graph replay (GPU time alone), and a torch.profiler split of one block call into its
  kernels' GPU times against the wall time (the rest is the GPU waiting for the host);
- variants of each grouped GEMM: the pointer kernels (kernels.moe_grouped_gemm) against the tensor-descriptor
  ones (kernels.moe_grouped_tma), one program per tile or persistent, with tile options; each with its TFLOP/s
  and the relative error of the experts' output through it against the pointer kernels' (128-row tiles).
Rows go to the CSV with the columns of bench.common.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import BenchRun, bench, start_run, write_rows
from bench.moe_layer import SHAPES, graph_time, one_block, set_provider
from kernels.hf_moe import register, router_spec
from kernels.moe_align import align_slots
from kernels.moe_experts import (ExpertWeights, TileConfig, fused_experts, grouped_down, grouped_gate_up,
                                 pick_configs)
from kernels.moe_grouped_gemm import ACTIVATIONS
from kernels.moe_router import route

TOKENS = [4096, 16384]


T_ = TileConfig  # short rows below
UP_VARIANTS = {
    "pointer 64x128 s4": T_(64, 128, 64, 8, 8, 4),
    "pointer 128x128 s3": T_(128, 128, 64, 8, 8, 3),
    "tma 128x128 s3": T_(128, 128, 64, 8, 8, 3, tma=True),
    "tma 128x128 s4": T_(128, 128, 64, 8, 8, 4, tma=True),
    "tma persistent 128x128 s3": T_(128, 128, 64, 8, 8, 3, tma=True, programs_per_sm=1),
}
DOWN_VARIANTS = {
    "pointer 64x128 slot s3": T_(64, 128, 64, 8, 8, 3, per_slot=True),
    "pointer 128x256 slot s3": T_(128, 256, 64, 8, 8, 3, per_slot=True),
    "tma persistent 128x256 slot s3": T_(128, 256, 64, 8, 8, 3, per_slot=True, tma=True, programs_per_sm=1),
    "tma persistent flatten 128x256 slot s3": T_(128, 256, 64, 8, 8, 3, per_slot=True, tma=True, programs_per_sm=1,
                                                 flatten=True),
    "tma persistent x2 128x128 w4 slot s3": T_(128, 128, 64, 8, 4, 3, per_slot=True, tma=True, programs_per_sm=2),
}


def kernel_profile(fn: Callable[[], object], calls: int = 5) -> tuple[dict[str, float], float]:
    """GPU time per call of each kernel fn launches (torch.profiler, CUDA activity), and the wall time per call
    over the same calls: their difference is time the GPU sat idle, waiting for the host."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / calls
    per_kernel: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if us > 0 and getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            per_kernel[evt.key] = per_kernel.get(evt.key, 0.0) + us / calls
    return per_kernel, wall * 1e6


def shape_rows(shape: str, tokens: list[int], run: BenchRun, out: Path) -> list[dict]:
    """All rows of one layer shape (see the module doc); rewrites `out` after each T."""
    register()
    cfg = SHAPES[shape]()
    model, block, u, gen = one_block(cfg, "grouped_mm")
    H = cfg.hidden_size
    I = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    k = cfg.num_experts_per_tok
    E = block.gate.weight.shape[0]
    w = ExpertWeights(block.experts.gate_up_proj, block.experts.down_proj)
    act = ACTIVATIONS[cfg.hidden_act]
    spec, _ = router_spec(block.gate)
    rows = []
    for T in tokens:
        base = run.row(kernel="moe_gemm", shape=shape, tokens=T)
        flops_up, flops_down = 2 * T * k * H * 2 * I, 2 * T * k * I * H

        def add(provider: str, t: float, flops: float | None = None, err: float | None = None) -> None:
            rows.append({**base, "provider": provider, "metric": "time", "value": round(t * 1e6, 2), "unit": "us"})
            line = f"{shape:14s} T={T:6d} {provider:34s} {t * 1e6:9.1f} us"
            if flops:
                rows.append({**base, "provider": provider, "metric": "tflops", "value": round(flops / t / 1e12, 1),
                             "unit": "TFLOP/s"})
                line += f" {flops / t / 1e12:6.0f} TFLOP/s ({flops / t / run.matmul:5.1%} of matmul)"
            if err is not None:
                rows.append({**base, "provider": provider, "metric": "rel_err_vs_pointer", "value": float(f"{err:.3e}"),
                             "unit": "ratio"})
                line += f" err {err:.1e}"
            print(line, flush=True)

        x = (torch.randn(T, H, device="cuda", generator=gen) + 4 * u).to(torch.bfloat16)
        with torch.no_grad():
            _, topw, topi = route(x, block.gate.weight, spec)
            set_provider(model, "grouped_mm")
            add("grouped_mm:block", bench(lambda: block(x[None]), reps=10))
            add("grouped_mm:router", bench(lambda: block.gate(x), reps=10))
            add("grouped_mm:experts", bench(lambda: block.experts(x, topi, topw), reps=10), flops_up + flops_down)
            set_provider(model, "fused_triton")
            add("fused_triton:block", bench(lambda: block(x[None]), reps=10))
            add("fused_triton:router", bench(lambda: route(x, block.gate.weight, spec), reps=10))
            a = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(H, 2 * I, device="cuda", dtype=torch.bfloat16)
            add("cublas:dense gate_up", bench(lambda: a @ b, reps=10), flops_up)
            a2 = torch.randn(T * k, I, device="cuda", dtype=torch.bfloat16)
            b2 = torch.randn(I, H, device="cuda", dtype=torch.bfloat16)
            add("cublas:dense down", bench(lambda: a2 @ b2, reps=10), flops_down)
            del a, b, a2, b2
            per_slot = torch.empty(T, k, H, device="cuda", dtype=torch.bfloat16)
            add("fused_triton:sum over k", bench(lambda: per_slot.sum(dim=1), reps=10))
            del per_slot

            for prov in ("grouped_mm", "fused_triton"):
                set_provider(model, prov)
                tg = graph_time(lambda: block(x[None]))
                if tg is not None:
                    add(f"{prov}:block+cudagraph", tg)
                per_kernel, wall = kernel_profile(lambda: block(x[None]))
                gpu = sum(per_kernel.values())
                rows.append({**base, "provider": f"{prov}:block", "metric": "gpu_busy_us", "value": round(gpu, 1),
                             "unit": "us"})
                print(f"{shape:14s} T={T:6d} {prov}: wall {wall:.0f} us per block, kernels {gpu:.0f} us", flush=True)
                for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]:
                    rows.append({**base, "provider": f"{prov}:kernel {name[:80]}", "metric": "gpu_us",
                                 "value": round(us, 1), "unit": "us"})
                    print(f"    {us:9.1f} us  {name[:100]}", flush=True)
            cu, cd = pick_configs(T, k, E)
            aligns = {bm: align_slots(topi, E, bm) for bm in (64, 128)}
            for bm, al in aligns.items():
                add(f"fused_triton:align bm{bm}", bench(lambda: align_slots(topi, E, bm), reps=10))
            ref = fused_experts(x, w, topw, topi, configs=(T_(128, 128, 64, 8, 8, 3),
                                                           T_(128, 256, 64, 8, 8, 3, per_slot=True)))
            add(f"fused_triton:experts picked ({tile_name(cu)} / {tile_name(cd)})",
                bench(lambda: fused_experts(x, w, topw, topi), reps=10), flops_up + flops_down)
            for name, c in UP_VARIANTS.items():
                try:
                    al = aligns[c.block_m]
                    d = T_(c.block_m, 128, 64, 8, 8, 3, per_slot=True)
                    err = rel(fused_experts(x, w, topw, topi, configs=(c, d)), ref)
                    add(f"gate_up {name}", bench(lambda: grouped_gate_up(x, w, al, k, act, c), reps=10), flops_up, err)
                except Exception as exc:  # a tile that does not fit, or a compile failure: report and go on
                    print(f"  gate_up {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            inters = {bm: grouped_gate_up(x, w, al, k, act, T_(bm, 128, 64, 8, 8, 3)) for bm, al in aligns.items()}
            for name, c in DOWN_VARIANTS.items():
                try:
                    al, inter = aligns[c.block_m], inters[c.block_m]
                    err = rel(grouped_down(inter, w, al, topw, T, k, c), ref)
                    add(f"down {name}", bench(lambda: grouped_down(inter, w, al, topw, T, k, c), reps=10),
                        flops_down, err)
                except Exception as exc:
                    print(f"  down {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        write_rows(out, run.rows + rows)
    del model, block
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def tile_name(c: TileConfig) -> str:
    grid = f" persistent x{c.programs_per_sm}" if c.programs_per_sm else ""
    return (f"{'tma' if c.tma else 'pointer'}{grid} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} "
            f"s{c.num_stages}{' slot' if c.per_slot else ''}")


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of got against ref (same shape)."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/moe_gemm.csv")
    ap.add_argument("--shapes", nargs="*", default=["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"])
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    run = start_run("moe_gemm")
    if run is None:
        return 2
    for shape in args.shapes:
        run.rows += shape_rows(shape, args.tokens, run, Path(args.out))
        write_rows(Path(args.out), run.rows)
    print(f"wrote {len(run.rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
