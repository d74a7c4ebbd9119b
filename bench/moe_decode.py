"""Where a decode-sized MoE block's GPU time goes, against the weight-read floor (issue 21, point 4).

    python -m bench.moe_decode [--out bench/results/moe_decode.csv] [--only deepseek-v3 kimi-k2 ...]
                               [--tokens 1 4 16] [--shapes N] [--sweep]

For each shape of bench.moe_grid (the anchors, plus N drawn by its rule) and each token count, everything as
CUDA-graph replays (what a captured decode step pays: the GPU's time alone):
- the whole block: best stock backend (`grouped_mm`, `batched_mm`), ours alone (`fused_triton`) and
  `dispatched` (what `enable_fused_moe` runs), also as plain calls back to back (`plain_time`), with the
  dispatcher's own timings of each part printed;
- its parts: our router and the stock one; our experts and `grouped_mm`'s on the stock routing; the rest of the
  block (shared expert and its gate), as the stock code runs it; and at the decode path's token counts our
  experts with the shared expert inside (kernels/hf_shared.py), the call our fused block makes;
- the weight-read floor: the bytes of the distinct experts routed to plus every other weight of the block, over
  the copy bandwidth measured at the start of the run; each time's share of it.
`--sweep` adds, at the first token count, the decode GEMV's tiles (kernels.moe_experts.GemvConfig) for gate/up
and for down, timed as graph replays of our experts alone (SiLU gate: the tiles' speed does not depend on it).
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch

from bench.common import start_run, write_rows
from bench.moe_grid import (
    BATCHED_MM_BUDGET,
    _out,
    _time,
    block_copies,
    build_block,
    floor_bytes,
    grid,
    router,
    set_provider,
    set_providers,
)
from bench.moe_layer import graph_time
from kernels import dispatch
from kernels.hf_moe import fused_triton_experts_forward, register
from kernels.hf_shared import shared_expert, structure_problem
from kernels.moe_experts import DECODE_MAX_TOKENS, GEMV_MAX_TOKENS, GEMV_TILES, ExpertWeights, GemvConfig, fused_experts

GEMV_SWEEP = [GemvConfig(16, 512, 4), GemvConfig(8, 512, 4), GemvConfig(8, 1024, 4), GemvConfig(16, 1024, 8),
              GemvConfig(32, 512, 8), GemvConfig(4, 1024, 4), GemvConfig(8, 2048, 8), GemvConfig(16, 256, 2),
              GemvConfig(32, 256, 4), GemvConfig(64, 256, 8)]


def _weights(ex: torch.nn.Module) -> ExpertWeights:
    bias = bool(getattr(ex, "has_bias", False))
    return ExpertWeights(ex.gate_up_proj, ex.down_proj, transposed=bool(getattr(ex, "is_transposed", False)),
                         concatenated=bool(getattr(ex, "is_concatenated", True)),
                         gate_up_bias=ex.gate_up_proj_bias if bias else None,
                         down_bias=ex.down_proj_bias if bias else None)


def _rest(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """The block's work beside the router and the routed experts, as its stock code does it: the shared expert
    (DeepSeek's `shared_experts`, Qwen2-MoE's `shared_expert` times its sigmoid gate); None without one."""
    if hasattr(block, "shared_experts"):
        return block.shared_experts(h)
    if hasattr(block, "shared_expert"):
        return torch.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)
    return None


def shape_rows(run, s, tokens: list[int], sweep: bool) -> list[dict]:
    register()
    block = build_block(s)
    blocks = block_copies(block, s)  # every graph cycles through them: a small layer's weights come from memory
    rows: list[dict] = []
    for n, T in enumerate(tokens):
        x = (torch.randn(1, T, s.hidden, device="cuda") + 4 * block.u).to(torch.bfloat16)
        h = x.view(-1, s.hidden)
        base = dict(kernel="moe_decode", shape=s.name, tokens=T)
        set_provider(block, "grouped_mm")
        with torch.no_grad():
            _, w, idx = router(block)(h)
        floor_s = floor_bytes(block, idx) / run.bandwidth
        times: dict[str, float | None] = {}
        plain: dict[str, float] = {}
        for prov in ("grouped_mm", "batched_mm", "fused_triton", "dispatched"):
            if prov == "batched_mm" and T * s.top_k * 3 * s.hidden * s.width * 2 > BATCHED_MM_BUDGET:
                continue
            set_providers(blocks, prov)
            if prov == "dispatched":
                dispatch._default = dispatch.Dispatcher(None)
            with torch.no_grad():
                _out(block, x)  # the dispatcher measures here
                plain[prov] = _time(lambda: _out(block, x))
                times[f"block {prov}"] = graph_time([lambda b=b: _out(b, x) for b in blocks])
            if prov == "dispatched":  # what it measured, per part and regime, and chose
                for key, tt in dispatch._default.timings.items():
                    what = next(p for p in key.split("|") if p.startswith(("experts", "router", "block")))
                    part = what.split(" ")[0] + (" graph" if key.endswith(dispatch.GRAPH) else " plain")
                    print(f"{'':22s} dispatch {part}: " + "  ".join(f"{k} {v * 1e6:.0f}" for k, v in tt.items())
                          + f" -> {dispatch._default.choices[key]}", flush=True)
        for prov, t in plain.items():
            rows.append(run.row(**base, provider=f"block {prov}", metric="plain_time", value=round(t * 1e6, 2),
                                unit="us"))
        set_providers(blocks, "fused_triton")
        with torch.no_grad():
            router(block)(h)
        times["router ours"] = graph_time([lambda b=b: router(b)(h) for b in blocks])
        set_providers(blocks, "grouped_mm")
        times["router stock"] = graph_time([lambda b=b: router(b)(h) for b in blocks])
        os.environ[dispatch.ENV] = "fused"
        wts = [_weights(b.experts) for b in blocks]
        times["experts ours"] = graph_time([lambda b=b: fused_triton_experts_forward(b.experts, h, idx, w)
                                            for b in blocks])
        times["experts grouped_mm"] = graph_time([lambda b=b: b.experts(h, idx, w) for b in blocks])
        if _rest(block, h) is not None:
            times["rest (shared expert) stock"] = graph_time([lambda b=b: _rest(b, h) for b in blocks])
            if structure_problem(block) is None and T <= DECODE_MAX_TOKENS:  # the shared expert in our kernels
                shs = [shared_expert(b) for b in blocks]
                times["experts+shared ours"] = graph_time([lambda i=i: fused_experts(h, wts[i], w, idx, shared=shs[i])
                                                           for i in range(len(blocks))])
        for name, t in times.items():
            if t is None:
                rows.append(run.row(**base, provider=name, metric="failed", value=1, unit="capture"))
                continue
            rows.append(run.row(**base, provider=name, metric="graph_time", value=round(t * 1e6, 2), unit="us"))
            rows.append(run.row(**base, provider=name, metric="floor_share", value=round(floor_s / t, 4),
                                unit="ratio"))
        rows.append(run.row(**base, provider="floor", metric="graph_time", value=round(floor_s * 1e6, 2),
                            unit=f"us ({idx.unique().numel()} experts read)"))
        line = "  ".join(f"{k} {v * 1e6:.0f}" for k, v in times.items() if v is not None)
        pline = "  ".join(f"{k} {v * 1e6:.0f}" for k, v in plain.items())
        print(f"{s.name:22s} T={T:3d} floor {floor_s * 1e6:.0f} us ({idx.unique().numel()} experts) | graph: {line}"
              f" | plain: {pline}", flush=True)
        if sweep and n == 0 and T <= GEMV_MAX_TOKENS:
            rows += gemv_sweep(run, base, h, wts, w, idx)
    os.environ[dispatch.ENV] = "measure"
    del block, blocks
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def gemv_sweep(run, base: dict, h: torch.Tensor, wts: list[ExpertWeights], w: torch.Tensor,
               idx: torch.Tensor) -> list[dict]:
    """Graph-replay time of our experts (cycling over the copies `wts`) on the decode path for each gate/up tile
    (down at today's), then each down tile (gate/up at the best)."""
    rows = []

    def timed(up: GemvConfig, down: GemvConfig) -> float:
        with torch.no_grad():
            t = graph_time([lambda c=c: fused_experts(h, c, w, idx, force_path="gemv", gemv=(up, down)) for c in wts])
        return float("inf") if t is None else t

    up_t = {c: timed(c, GEMV_TILES[1]) for c in GEMV_SWEEP}
    best_up = min(up_t, key=up_t.__getitem__)
    down_t = {c: timed(best_up, c) for c in GEMV_SWEEP}
    for tag, tt in (("up", up_t), ("down", down_t)):
        for c, t in tt.items():
            rows.append(run.row(**base, provider=f"gemv {tag} n{c.block_n} k{c.block_k} w{c.num_warps}",
                                metric="graph_time", value=round(t * 1e6, 2), unit="us"))
    best_down = min(down_t, key=down_t.__getitem__)
    print(f"{'':22s} gemv: today {up_t[GEMV_TILES[0]] * 1e6:.0f} us; best up {best_up} down {best_down}: "
          f"{down_t[best_down] * 1e6:.0f} us", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_decode.csv"))
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--shapes", type=int, default=0, help="shapes drawn by bench.moe_grid's rule beside the anchors")
    ap.add_argument("--only", nargs="*", default=None, help="shape names to run (default: all)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the decode GEMV's tiles at the first count")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting shapes after this many seconds")
    args = ap.parse_args(argv)
    run = start_run("moe_decode")
    if run is None:
        return 2
    t0 = time.perf_counter()
    rows = list(run.rows)
    for s in [s for s in grid(args.shapes) if args.only is None or s.name in args.only]:
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            print("budget reached", flush=True)
            break
        rows += shape_rows(run, s, args.tokens, args.sweep)
        write_rows(args.out, rows)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
