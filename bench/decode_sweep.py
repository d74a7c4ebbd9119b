"""The decode kernels' choices, swept: the router's one kernel against its split matmul, and the decode GEMV's
tiles and slot groups, timed as the GPU runs them inside a captured decode step (issue 21, point 4).

    python -m bench.decode_sweep [--out bench/results/decode_sweep.csv] [--tokens 1 4] [--only router experts]
    python -m bench.decode_sweep --only paths [--path-tokens 8 16] [--layouts qwen3-30b-a3b ...]
    python -m bench.decode_sweep --only dense [--tokens 1 4 16] [--layouts smollm2-moe ...]

Every time is a CUDA-graph replay divided over the many calls captured in it (bench.moe_layer.CallGraph), the
calls cycling over copies of the weights so that small layers are read from memory (l2_copies). Rows:
- `router one` / `router split` / `router gemm` for 12 routers (E = 8-384, H = 576-7168, bf16 and float32 logits)
  at `--router-tokens` (default 1, 4, 16 and 64; kernels.moe_router.route with the one kernel, the split matmul
  and the matmul logits forced), beside `router torch` (a softmax router in PyTorch ops, as transformers runs it);
- per expert layout of the grid's anchors (and GPT-OSS's transposed, biased one) and token count: our experts
  with each gate/up tile (down at one group), then each down tile x slot groups (gate/up at the best), and with
  the built-in choice (`experts default`), beside the weight-read floor of the experts routed to;
- (`--only paths`, at `--path-tokens`, default 8 and 16) the same layouts on each path of fused_experts: the
  per-slot GEMV, the expert-rows kernels with each tile of ROWS_SWEEP (`rows <tile>`, the same tile for gate/up
  and down) and the best of those with each down tile of ROWS_DOWN_SWEEP, the grouped GEMMs, and the built-in
  choice;
- (`--only dense`, at `--tokens`) what the weight-read floor asks of a small layer, read without routing: the
  distinct experts the call routes to gathered beforehand into two dense matrices ([n 2I, H] and [H, n I]) and read
  by two cuBLAS matmuls (`dense gemms`: the bytes of the floor, the routing known, no activation, no dependency
  between the two), beside our experts on the same routing (`experts default`) and a chain of three dependent
  one-element kernels (`chain3 empty`: what three dependent steps, router -> gate/up -> down, cost with nothing to
  read). If `dense gemms` is below half the floor, no block that must also route can reach it as launched kernels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import start_run, write_rows
from bench.moe_layer import graph_time, l2_copies
from kernels.moe_experts import ExpertWeights, GemvConfig, RowsConfig, fused_experts
from kernels.moe_router import RouterSpec, route

ROUTERS = [(8, 576, False), (8, 4096, False), (32, 2880, False), (60, 2048, False), (64, 2048, False),
           (128, 2048, False), (128, 4096, False), (256, 3072, False), (384, 3072, False), (384, 7168, False),
           (16, 4096, True), (256, 7168, True)]
# (name, experts, top-k, hidden, width, transposed layout)
EXPERTS = [("qwen3-30b-a3b", 128, 8, 2048, 768, False), ("olmoe-1b-7b", 64, 8, 2048, 1024, False),
           ("qwen2-moe-a2.7b", 60, 4, 2048, 1408, False), ("smollm2-moe", 8, 2, 576, 1536, False),
           ("mixtral-8x7b", 8, 2, 4096, 14336, False), ("deepseek-v3", 256, 8, 7168, 2048, False),
           ("e32-k1-h2048-i512", 32, 1, 2048, 512, False), ("gpt-oss-20b", 32, 4, 2880, 2880, True),
           ("e256-k8-h3072-i256", 256, 8, 3072, 256, False), ("e128-k6-h3072-i512", 128, 6, 3072, 512, False)]
UPS = [GemvConfig(16, 512, 4), GemvConfig(4, 1024, 4), GemvConfig(2, 1024, 4), GemvConfig(4, 2048, 8),
       GemvConfig(8, 1024, 4), GemvConfig(4, 512, 2)]
DOWNS = [GemvConfig(16, 1024, 8), GemvConfig(8, 1024, 8), GemvConfig(8, 1024, 4), GemvConfig(4, 1024, 4)]

ROWS_SWEEP = [RowsConfig(16, 256, 4, 3), RowsConfig(16, 128, 4, 4), RowsConfig(32, 256, 4, 3), RowsConfig(64, 64, 4, 3),
              RowsConfig(32, 128, 4, 3)]

# Down tiles tried beside the best common tile: wider column tiles give a program more of a narrow expert's
# weights (I = 256-512: 32 columns are 16-32 KiB).
ROWS_DOWN_SWEEP = [RowsConfig(64, 128, 4, 3), RowsConfig(128, 128, 4, 3), RowsConfig(128, 64, 4, 3),
                   RowsConfig(64, 256, 4, 3)]


def _name(c: GemvConfig | RowsConfig) -> str:
    if isinstance(c, RowsConfig):
        return f"n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages}"
    return f"n{c.block_n} k{c.block_k} w{c.num_warps}" + (f" g{c.groups}" if c.groups else "")


def torch_router(h: torch.Tensor, w: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, ...]:
    """A softmax router as transformers' Qwen3/OLMoE routers compute it, in PyTorch ops (the stock baseline)."""
    logits = torch.nn.functional.linear(h.to(w.dtype), w)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    topw, topi = torch.topk(probs, spec.top_k, dim=-1)
    if spec.renormalize:
        topw = topw / topw.sum(dim=-1, keepdim=True)
    return logits, topw.to(h.dtype), topi


def router_rows(run, tokens: list[int]) -> list[dict]:
    rows = []
    for E, H, fp32 in ROUTERS:
        spec = RouterSpec(top_k=min(8, E), fp32_logits=fp32)
        w = torch.randn(E, H, device="cuda", dtype=torch.float32 if fp32 else torch.bfloat16) * 0.02
        shape = f"router E={E} H={H}" + (" fp32" if fp32 else "")
        line = []
        for T in tokens:
            h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            provs = {"router one": lambda: route(h, w, spec, split=False, gemm=False),
                     "router split": lambda: route(h, w, spec, split=True),
                     "router gemm": lambda: route(h, w, spec, split=False, gemm=True),
                     "router torch": lambda: torch_router(h, w, spec)}
            got = {}
            for prov, fn in provs.items():
                t = graph_time(fn, 20)
                got[prov] = float("inf") if t is None else round(t * 1e6, 2)
                rows.append(run.row(kernel="decode_sweep", provider=prov, shape=shape, tokens=T, metric="graph_time",
                                    value=got[prov], unit="us"))
            line.append(f"T={T}: " + " ".join(f"{p.split()[1]} {v}" for p, v in got.items()))
        print(f"{shape:26s} " + " | ".join(line), flush=True)
    return rows


def experts_rows(run, tokens: list[int]) -> list[dict]:
    rows = []
    for name, E, k, H, I, transposed in EXPERTS:
        per_call = k * 3 * H * I * 2
        ws = []
        for _ in range(l2_copies(per_call, E * 3 * H * I * 2)):
            gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
            dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
            if transposed:  # GPT-OSS keeps [E, H, 2I] / [E, I, H]
                gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
            ws.append(ExpertWeights(gu, dn, transposed=transposed))
        for T in tokens:
            h, ids, tw = _random_call(T, E, k, H)
            base = dict(kernel="decode_sweep", shape=name + (" transposed" if transposed else ""), tokens=T)

            def timed(tiles: tuple[GemvConfig, GemvConfig] | None) -> float:
                t = graph_time([lambda w=w: fused_experts(h, w, tw, ids, force_path="gemv", gemv=tiles) for w in ws])
                return float("inf") if t is None else t * 1e6

            one_group = GemvConfig(16, 1024, 8, groups=1)
            ups = {u: timed((u, one_group)) for u in UPS}
            best_up = min(ups, key=ups.__getitem__)
            downs = {GemvConfig(d.block_n, d.block_k, d.num_warps, groups=g): 0.0 for d in DOWNS
                     for g in (1, 2, 4, 8) if g <= k}
            downs = {d: timed((best_up, d)) for d in downs}
            default = timed(None)
            floor = ids.unique().numel() * 3 * H * I * 2 / run.bandwidth * 1e6
            for tag, tt in (("experts up", ups), ("experts down", downs)):
                for c, t in tt.items():
                    rows.append(run.row(**base, provider=f"{tag} {_name(c)}", metric="graph_time", value=round(t, 2),
                                        unit="us"))
            rows.append(run.row(**base, provider="experts default", metric="graph_time", value=round(default, 2),
                                unit="us"))
            rows.append(run.row(**base, provider="floor", metric="graph_time", value=round(floor, 2),
                                unit=f"us ({ids.unique().numel()} experts read)"))
            best_down = min(downs, key=downs.__getitem__)
            print(f"{base['shape']:28s} T={T} floor {floor:.1f} us | default {default:.1f} | best up {_name(best_up)} "
                  f"{ups[best_up]:.1f} (16x512: {ups[UPS[0]]:.1f}) | best down {_name(best_down)} "
                  f"{downs[best_down]:.1f}", flush=True)
        del ws
        torch.cuda.empty_cache()
    return rows


def _random_call(T: int, E: int, k: int, H: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode call's inputs under uniform routing: tokens [T, H] bf16, k distinct expert ids per token [T, k]
    int32, routing weights [T, k] float32."""
    h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)]).int()
    return h, ids, torch.rand(T, k, device="cuda")


def _weights(E: int, H: int, I: int, k: int, transposed: bool) -> list[ExpertWeights]:
    # Copies of one layout's random weights, enough that a call's weights have left L2 when its copy comes again.
    ws = []
    for _ in range(l2_copies(k * 3 * H * I * 2, E * 3 * H * I * 2)):
        gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
        dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
        if transposed:  # GPT-OSS keeps [E, H, 2I] / [E, I, H]
            gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
        ws.append(ExpertWeights(gu, dn, transposed=transposed))
    return ws


def path_rows(run, tokens: list[int], layouts: list[str] | None = None) -> list[dict]:
    """Each layout (of `layouts` by name, default all) at each token count on every path of fused_experts (see the
    module docstring)."""
    rows = []
    for name, E, k, H, I, transposed in EXPERTS:
        if layouts and name not in layouts:
            continue
        ws = _weights(E, H, I, k, transposed)
        for T in tokens:
            h, ids, tw = _random_call(T, E, k, H)
            base = dict(kernel="decode_sweep", shape=name + (" transposed" if transposed else ""), tokens=T)

            def timed(**kw) -> float:
                t = graph_time([lambda w=w: fused_experts(h, w, tw, ids, **kw) for w in ws])
                return float("inf") if t is None else t * 1e6

            got = {"gemv": timed(force_path="gemv"), "grouped": timed(force_path="grouped"), "default": timed()}
            if transposed:
                got["rows default tile"] = timed(force_path="rows")
            if T * k <= 128:
                same = {c: timed(force_path="rows", rows=(c, c)) for c in ROWS_SWEEP}
                got.update({f"rows {_name(c)}": t for c, t in same.items()})
                best = min(same, key=same.__getitem__)
                got.update({f"rows {_name(best)} / down {_name(d)}": timed(force_path="rows", rows=(best, d))
                            for d in ROWS_DOWN_SWEEP})
            floor = ids.unique().numel() * 3 * H * I * 2 / run.bandwidth * 1e6
            for prov, t in got.items():
                rows.append(run.row(**base, provider=f"experts {prov}", metric="graph_time", value=round(t, 2),
                                    unit="us"))
            rows.append(run.row(**base, provider="floor", metric="graph_time", value=round(floor, 2),
                                unit=f"us ({ids.unique().numel()} experts read)"))
            best = min(got, key=got.__getitem__)
            print(f"{base['shape']:28s} T={T} floor {floor:.1f} us | gemv {got['gemv']:.1f} | grouped "
                  f"{got['grouped']:.1f} | default {got['default']:.1f} | best {best} {got[best]:.1f}", flush=True)
        del ws
        torch.cuda.empty_cache()
    return rows


def dense_rows(run, tokens: list[int], layouts: list[str] | None = None) -> list[dict]:
    """Per layout (of `layouts`, default all) and token count: the floor's bytes read by two dense cuBLAS matmuls
    with the routing known, our experts on the same routing, and an empty three-kernel chain (module docstring)."""
    rows = []
    one = torch.zeros(1, device="cuda")

    def chain3() -> None:  # three dependent launches that read and write one float each
        one.add_(1)
        one.mul_(0.5)
        one.add_(1)

    chain = graph_time(chain3)
    rows.append(run.row(kernel="decode_sweep", provider="chain3 empty", shape="-", tokens=0, metric="graph_time",
                        value=round(chain * 1e6, 2), unit="us"))
    print(f"three dependent empty kernels: {chain * 1e6:.2f} us a call", flush=True)
    for name, E, k, H, I, transposed in EXPERTS:
        if layouts and name not in layouts:
            continue
        ws = _weights(E, H, I, k, transposed)
        for T in tokens:
            h, ids, tw = _random_call(T, E, k, H)
            used = ids.unique().long()
            n = used.numel()
            dense = []  # per copy: the routed experts' gate/up rows [n 2I, H] and down columns [H, n I], contiguous
            for w in ws:
                gu = w.gate_up[used].transpose(1, 2) if transposed else w.gate_up[used]  # [n, 2I, H]
                dn = w.down[used].transpose(1, 2) if transposed else w.down[used]  # [n, H, I]
                dense.append((gu.reshape(n * 2 * I, H).contiguous(),
                              dn.permute(1, 0, 2).reshape(H, n * I).contiguous()))
            a = torch.randn(T, n * I, device="cuda", dtype=torch.bfloat16)
            base = dict(kernel="decode_sweep", shape=name + (" transposed" if transposed else ""), tokens=T)

            def gemms(w1: torch.Tensor, w2: torch.Tensor) -> None:
                torch.nn.functional.linear(h, w1)
                torch.nn.functional.linear(a, w2)

            got = {"dense gemms": graph_time([lambda d=d: gemms(*d) for d in dense]),
                   "experts default": graph_time([lambda w=w: fused_experts(h, w, tw, ids) for w in ws])}
            got = {p: float("inf") if t is None else t * 1e6 for p, t in got.items()}
            floor = n * 3 * H * I * 2 / run.bandwidth * 1e6
            for prov, t in got.items():
                rows.append(run.row(**base, provider=prov, metric="graph_time", value=round(t, 2), unit="us"))
                rows.append(run.row(**base, provider=prov, metric="floor_share", value=round(floor / t, 4),
                                    unit="ratio"))
            rows.append(run.row(**base, provider="floor", metric="graph_time", value=round(floor, 2),
                                unit=f"us ({n} experts read)"))
            print(f"{base['shape']:28s} T={T} floor {floor:.1f} us | dense gemms {got['dense gemms']:.1f} "
                  f"({floor / got['dense gemms']:.2f}) | ours {got['experts default']:.1f} "
                  f"({floor / got['experts default']:.2f})", flush=True)
            del dense
        del ws
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode_sweep.csv"))
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--router-tokens", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--only", nargs="*", default=["router", "experts"], choices=["router", "experts", "paths", "dense"])
    ap.add_argument("--path-tokens", type=int, nargs="*", default=[8, 16])
    ap.add_argument("--layouts", nargs="*", default=None,
                    help="expert layouts of `paths` and `dense` by name (default: all)")
    args = ap.parse_args(argv)
    run = start_run("decode_sweep")
    if run is None:
        return 2
    torch.manual_seed(0)
    rows = list(run.rows)
    if "router" in args.only:
        rows += router_rows(run, args.router_tokens)
        write_rows(args.out, rows)
    if "experts" in args.only:
        rows += experts_rows(run, args.tokens)
        write_rows(args.out, rows)
    if "paths" in args.only:
        rows += path_rows(run, args.path_tokens, args.layouts)
        write_rows(args.out, rows)
    if "dense" in args.only:
        rows += dense_rows(run, args.tokens, args.layouts)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
