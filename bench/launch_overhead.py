"""Where the time of a decode-sized MoE block goes, and what the short launch path (kernels.launch) saves.

    python -m bench.launch_overhead [--out bench/results/launch_overhead.csv] [--shapes ...] [--tokens 1 16]

For each layer shape of bench.moe_layer and T in {1, 16}, one MoE block (router + experts) per provider:
transformers' `grouped_mm`, ours through Triton's own launch path (`fused_triton:triton_launch`, the short path
switched off) and ours through the short path (`fused_triton`). Per provider and shape:
- host_us: CPU time per block call, until the call returns (the GPU work is queued behind it);
- time: wall time per call with plain launches (CUDA events: what a decode step without graphs waits);
- graph time: a CUDA-graph replay of the block (the GPU-side time, what a decode loop with graphs gets);
- speedup over grouped_mm, plain and graph.
Then a cProfile breakdown of our block's host time by function (both launch paths), and the decode GEMV tiles:
graph-replay time of our experts at T=1 for gate/up and down tile configs (kernels.moe_experts.GemvConfig).
Rows go to the CSV with the columns of bench.common.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import bench, start_run, write_rows
from bench.moe_layer import SHAPES, graph_time, one_block, set_provider
from kernels import launch
from kernels.moe_experts import GEMV_DEFAULT, ExpertWeights, GemvConfig, fused_experts

PROVIDERS = {"grouped_mm": ("grouped_mm", "1"), "fused_triton:triton_launch": ("fused_triton", "0"),
             "fused_triton": ("fused_triton", "1")}
GEMV_CANDIDATES = [GEMV_DEFAULT, GemvConfig(8, 512, 4), GemvConfig(16, 1024, 4), GemvConfig(16, 256, 4),
                   GemvConfig(32, 256, 4), GemvConfig(32, 512, 8), GemvConfig(16, 512, 8), GemvConfig(64, 128, 4),
                   GemvConfig(32, 1024, 8), GemvConfig(64, 512, 8), GemvConfig(16, 1024, 8)]


def host_us(fn: Callable[[], object], calls: int = 50) -> float:
    """Host cost in us: CPU time per call over `calls` back-to-back calls with no sync between them."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def profile_rows(fn: Callable[[], object], base: dict, provider: str, calls: int = 200, top: int = 12) -> list[dict]:
    """cProfile of `calls` block calls: the `top` functions by own time, host us per block call (cProfile's own
    cost inflates every entry; the shares are what to read)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    entries = sorted(((tt, f"{Path(file).name}:{line}:{name}") for (file, line, name), (_, _, tt, _, _) in
                      stats.items()), reverse=True)
    total = sum(tt for tt, _ in entries)
    rows = [{**base, "provider": f"profile:{provider}", "metric": "host_us:total",
             "value": round(total / calls * 1e6, 2), "unit": "us"}]
    for tt, where in entries[:top]:
        rows.append({**base, "provider": f"profile:{provider}", "metric": f"host_us:{where}",
                     "value": round(tt / calls * 1e6, 2), "unit": "us"})
    return rows


def block_rows(shape: str, tokens: list[int], gpu: str, stamp: str) -> list[dict]:
    cfg = SHAPES[shape]()
    model, block, u, gen = one_block(cfg, "grouped_mm")
    rows = []
    for T in tokens:
        x = (torch.randn(1, T, cfg.hidden_size, device="cuda", generator=gen) + 4 * u).to(torch.bfloat16)
        base = dict(kernel="moe_block_launch", shape=shape, tokens=T, gpu=gpu, timestamp=stamp)
        times = {}
        for prov, (impl, short) in PROVIDERS.items():
            os.environ[launch.ENV] = short
            set_provider(model, impl)
            with torch.no_grad():
                fn = lambda: block(x)  # noqa: E731
                h = host_us(fn)
                t = bench(fn, reps=50)
                tg = graph_time(fn)
            times[prov] = (t, tg)
            rows += [{**base, "provider": prov, "metric": "host_us", "value": round(h, 2), "unit": "us"},
                     {**base, "provider": prov, "metric": "time", "value": round(t * 1e6, 2), "unit": "us"}]
            if tg is not None:
                rows.append({**base, "provider": prov + "+cudagraph", "metric": "time", "value": round(tg * 1e6, 2),
                             "unit": "us"})
            print(f"{shape:14s} T={T:3d} {prov:28s} host {h:7.1f} us  plain {t * 1e6:7.1f} us  "
                  f"graph {(tg or float('nan')) * 1e6:7.1f} us", flush=True)
        ref_t, ref_g = times["grouped_mm"]
        for prov, (t, tg) in times.items():
            if prov == "grouped_mm":
                continue
            rows.append({**base, "provider": prov, "metric": "speedup_vs_grouped_mm", "value": round(ref_t / t, 3),
                         "unit": "x"})
            if tg is not None and ref_g is not None:
                rows.append({**base, "provider": prov + "+cudagraph", "metric": "speedup_vs_grouped_mm",
                             "value": round(ref_g / tg, 3), "unit": "x"})
        if T in (tokens[0], 4096):  # the host cost of the decode (GEMV) and of the prefill (grouped) path
            for prov in ("fused_triton:triton_launch", "fused_triton"):
                os.environ[launch.ENV] = PROVIDERS[prov][1]
                set_provider(model, "fused_triton")
                with torch.no_grad():
                    rows += profile_rows(lambda: block(x), base, prov)
        if T == 1:
            rows += gemv_rows(block, x, base)
    os.environ[launch.ENV] = "1"
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def gemv_rows(block: torch.nn.Module, x: torch.Tensor, base: dict) -> list[dict]:
    """Decode GEMV tiles at this T: graph-replay time of our experts with each gate/up config (down at the
    default), then each down config (gate/up at the best)."""
    h = x.view(-1, x.shape[-1])
    with torch.no_grad():
        _, topw, topi = block.gate(h)
    w = ExpertWeights(block.experts.gate_up_proj, block.experts.down_proj)
    rows, best_up = [], (float("inf"), GEMV_DEFAULT)

    def timed(tag: str, up: GemvConfig, down: GemvConfig) -> float:
        with torch.no_grad():
            t = graph_time(lambda: fused_experts(h, w, topw, topi, force_path="gemv", gemv=(up, down)))
        t = float("inf") if t is None else t
        c = up if tag == "up" else down
        rows.append({**base, "provider": f"gemv {tag} n{c.block_n} k{c.block_k} w{c.num_warps}", "metric": "time",
                     "value": round(t * 1e6, 2), "unit": "us"})
        return t

    for cfg in GEMV_CANDIDATES:
        best_up = min(best_up, (timed("up", cfg, GEMV_DEFAULT), cfg), key=lambda p: p[0])
    best = (float("inf"), GEMV_DEFAULT)
    for cfg in GEMV_CANDIDATES:
        best = min(best, (timed("down", best_up[1], cfg), cfg), key=lambda p: p[0])
    print(f"{'':14s} gemv best: up {best_up[1]} down {best[1]}: {best[0] * 1e6:.1f} us (graph)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/launch_overhead.csv")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 16])
    args = ap.parse_args(argv)
    run = start_run("launch_overhead")
    if run is None:
        return 2
    out = Path(args.out)
    for shape in args.shapes:
        run.rows += block_rows(shape, args.tokens, run.gpu, run.stamp)
        write_rows(out, run.rows)  # after each shape: a run cut short keeps what it measured
    print(f"wrote {len(run.rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
