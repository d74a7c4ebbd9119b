"""Fused MoE kernels against transformers' `eager` and `grouped_mm`, in one GPU run.

    python -m bench.moe_layer [--out bench/results/moe_layer.csv] [--quick] [--no-model] [--sweep]

For the OLMoE-1B-7B, Qwen3-30B-A3B, SmolLM2-MoE (our PRESET=h100 teacher) and Mixtral-8x7B layer shapes at
T in {1, 16, 256, 4096, 16384}, with skewed routing (Zipf-like expert popularity, as trained routers show), it
times one MoE block (router + experts) per provider, plain calls and CUDA-graph replays, and reports time,
TFLOP/s and the share of the physical floor, where floor = max(FLOPs / measured bf16 matmul rate, bytes /
measured copy bandwidth), both ceilings measured at the start of this run; bytes count the weights of the
experts this routing actually hits, plus input and output.
Then it times whole-model forward (8 x 2048 tokens, random weights) for each provider and a dense Llama twin
with the same active FFN width. Every row goes to the CSV with columns
kernel, provider, shape, tokens, metric, value, unit, gpu, timestamp.
"""

from __future__ import annotations

import argparse
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from bench.common import bench, start_run, write_rows
from kernels.hf_moe import enable_fused_moe, register
from kernels.hf_shared import uninstall_fused_blocks
from kernels.moe_experts import TileConfig

SHAPES = {
    "olmoe-1b-7b": lambda: OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                       num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                       num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096),
    "qwen3-30b-a3b": lambda: Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                            moe_intermediate_size=768, num_hidden_layers=12, num_attention_heads=32,
                                            num_key_value_heads=4, head_dim=128, num_experts=128,
                                            num_experts_per_tok=8, norm_topk_prob=True,
                                            max_position_embeddings=4096),
    # The PRESET=h100 teacher: SmolLM2-135M upcycled to 8 experts, top-2; experts far narrower than the others.
    "smollm2-moe": lambda: MixtralConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=8192),
    "mixtral-8x7b": lambda: MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                                          num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096),
}
MODEL_NOTE = {"olmoe-1b-7b": "16 of 16 layers", "qwen3-30b-a3b": "12 of 48 layers", "smollm2-moe": "30 of 30 layers",
              "mixtral-8x7b": "4 of 32 layers"}
TOKENS = [1, 16, 256, 4096, 16384]
PROVIDERS = ["eager", "grouped_mm", "fused_triton"]
ZIPF = 1.0  # expert popularity ~ 1/rank^ZIPF


def skew_router(block: torch.nn.Module, hidden: int, gen: torch.Generator) -> torch.Tensor:
    """Give the router a Zipf-like preference along a direction u that inputs share; returns u [H].

    logits_e = x . W_e with W_e = noise/sqrt(H) + b_e * u and x = noise + 4u, so expert e's logit is shifted by
    about 4 b_e; b_e = log(1/rank^ZIPF) / 4 makes popularity fall off roughly as 1/rank."""
    w = (block.gate if hasattr(block, "gate") else block.router).weight  # GPT-OSS names its router `router`
    E, H = w.shape
    u = torch.randn(H, device="cuda", generator=gen)
    u /= u.norm()
    rank = torch.randperm(E, device="cuda", generator=gen).float() + 1
    b = -ZIPF * torch.log(rank) / 4
    with torch.no_grad():
        w.copy_((torch.randn(E, H, device="cuda", generator=gen) / math.sqrt(H) + b[:, None] * u[None, :]).to(w.dtype))
    return u


def layer_rows(shape: str, cfg, peak_flops: float, peak_bw: float, tokens: list[int], stamp: str, gpu: str,
               sweep: bool) -> list[dict]:
    """Time one MoE block (router + experts) per provider and token count."""
    register()
    model, block, u, gen = one_block(cfg, "eager")
    E = block.gate.weight.shape[0]
    k = cfg.num_experts_per_tok
    H = cfg.hidden_size
    I = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    rows = []
    for T in tokens:
        x = (torch.randn(1, T, H, device="cuda", generator=gen) + 4 * u).to(torch.bfloat16)
        with torch.no_grad():
            _, _, idx = block.gate(x.view(-1, H))
        hit = int(torch.unique(idx).numel())
        counts = torch.bincount(idx.reshape(-1), minlength=E).float()
        flops = T * k * 3 * 2 * H * I
        bytes_ = hit * 3 * H * I * 2 + 2 * T * H * 2 + E * H * 2
        floor = max(flops / peak_flops, bytes_ / peak_bw)
        base = dict(kernel="moe_layer", shape=shape, tokens=T, gpu=gpu, timestamp=stamp)
        rows.append({**base, "provider": "routing", "metric": "experts_hit", "value": hit, "unit": "experts"})
        rows.append({**base, "provider": "routing", "metric": "max_over_mean_load",
                     "value": round(float(counts.max() / counts.mean()), 3), "unit": "ratio"})
        rows.append({**base, "provider": "floor", "metric": "time", "value": round(floor * 1e6, 2), "unit": "us"})
        ref = None
        for prov in PROVIDERS:
            set_provider(model, prov)
            with torch.no_grad():
                out = block(x)
                if ref is None:
                    ref = out.double()
                err = ((out.double() - ref).norm() / ref.norm()).item()
                t = bench(lambda: block(x), reps=20 if T <= 4096 else 10)
            rows += _perf_rows(base, prov, t, flops, floor, err)
            print(f"{shape:14s} T={T:6d} {prov:13s} {t * 1e6:10.1f} us  {flops / t / 1e12:7.1f} TFLOP/s  "
                  f"floor share {floor / t:6.1%}  rel.err vs eager {err:.1e}", flush=True)
            if prov != "eager":
                # Replaying a CUDA graph shows the GPU-side time alone: at few tokens launches, not the GPU, set
                # the pace of plain calls (a decode loop with graphs gets the graph time); at many, the host's time
                # before the first large GEMM is still in a plain call. Both paths are capturable (no host syncs).
                tg = graph_time(lambda: block(x))
                if tg is not None:
                    rows += _perf_rows(base, prov + "+cudagraph", tg, flops, floor, err)
                    print(f"{'':14s} {'':8s} {prov + '+graph':13s} {tg * 1e6:10.1f} us  floor share {floor / tg:6.1%}",
                          flush=True)
        if T <= 64:
            rows += _breakdown(block, x, base, floor)
        if sweep and T >= 256:
            rows += _sweep(block, x, base, floor)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _breakdown(block, x, base, floor) -> list[dict]:
    """Few tokens: our router alone and our experts alone on each path, plain launches and CUDA-graph replay."""
    from kernels.hf_moe import router_spec
    from kernels.moe_experts import ExpertWeights, fused_experts
    from kernels.moe_router import route

    h = x.view(-1, x.shape[-1])
    spec, _ = router_spec(block.gate)
    _, topw, topi = route(h, block.gate.weight, spec)
    w = ExpertWeights(block.experts.gate_up_proj, block.experts.down_proj)
    parts = {"router": lambda: route(h, block.gate.weight, spec),
             "experts_gemv": lambda: fused_experts(h, w, topw, topi, force_path="gemv"),
             "experts_grouped": lambda: fused_experts(h, w, topw, topi, force_path="grouped")}
    rows = []
    for name, fn in parts.items():
        t = bench(fn, reps=30)
        tg = graph_time(fn)
        rows.append({**base, "provider": f"fused_triton:{name}", "metric": "time", "value": round(t * 1e6, 2),
                     "unit": "us"})
        if tg is not None:
            rows.append({**base, "provider": f"fused_triton:{name}+cudagraph", "metric": "time",
                         "value": round(tg * 1e6, 2), "unit": "us"})
        print(f"{'':14s} {'':8s} {name:16s} {t * 1e6:8.1f} us, graph {(tg or float('nan')) * 1e6:8.1f} us", flush=True)
    return rows


GRAPH_BATCH_S = 5e-4  # GPU time a timed graph aims at: enough calls that its launch is a small share
GRAPH_MAX_CALLS = 32


def graph_time(fn: Callable[[], object] | Sequence[Callable[[], object]], calls: int | None = None) -> float | None:
    """Median seconds per call of fn as a CUDA-graph replay (`CallGraph`), or None when fn cannot be captured."""
    g = CallGraph.capture(fn, calls)
    return None if g is None else g.time()


@dataclass
class CallGraph:
    """`calls` calls of a function captured back to back into one CUDA graph.

    A graph of one call charges every replay the graph's launch, which a decode step's graph pays once for all
    its layers (one H200: a graph of one 1-us kernel timed 18.9 us a replay, the same kernel 1.0 us a call in a
    graph of 40); so a replay's time is divided over many calls (`capture`'s default: about GRAPH_BATCH_S of GPU
    time, at most GRAPH_MAX_CALLS). fn may be a list of callables (the same work on copies of the weights,
    `l2_copies`): the calls cycle through it, so that a small layer's weights come from memory, not from the L2
    cache the previous call left them in."""

    graph: torch.cuda.CUDAGraph
    calls: int

    @staticmethod
    def capture(fn: Callable[[], object] | Sequence[Callable[[], object]],
                calls: int | None = None) -> CallGraph | None:
        """The graph of fn's calls, or None (the reason printed) when fn cannot be captured."""
        fns = list(fn) if isinstance(fn, Sequence) else [fn]
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(s):
                for _ in range(3):
                    for f in fns:
                        f()
            torch.cuda.current_stream().wait_stream(s)

            def captured(n: int) -> CallGraph:
                g = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(g):
                    for i in range(n):
                        fns[i % len(fns)]()
                return CallGraph(g, n)

            if calls is None:
                one = captured(len(fns)).time(reps=5)
                calls = max(1, min(GRAPH_MAX_CALLS, int(GRAPH_BATCH_S / max(one, 1e-7))))
            return captured(max(calls, len(fns)) // len(fns) * len(fns))  # every copy as often
        except Exception as err:
            print(f"  graph capture failed: {type(err).__name__}: {str(err)[:100]}", flush=True)
            return None

    def time(self, reps: int = 30) -> float:
        """Median seconds per call over `reps` replays."""
        return bench(self.graph.replay, reps=reps, warm=3) / self.calls


def l2_copies(bytes_per_call: float, bytes_per_copy: float, budget: float = 16e9, most: int = 8,
              l2: int | None = None) -> int:
    """How many copies of a layer's weights `graph_time` should cycle through so that one call's weights have
    left the L2 cache when the next call on the same copy comes: enough for 3 x the L2's size between two calls
    on one copy (a real forward runs every other layer in between), at most `most` and `budget` bytes in all.
    l2: the cache's bytes (default: the current GPU's)."""
    if l2 is None:
        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    want = -(-3 * l2 // max(1, int(bytes_per_call)))
    return int(max(1, min(most, want, budget // max(1.0, bytes_per_copy))))


def _perf_rows(base: dict, prov: str, t: float, flops: float, floor: float, err: float) -> list[dict]:
    return [{**base, "provider": prov, "metric": "time", "value": round(t * 1e6, 2), "unit": "us"},
            {**base, "provider": prov, "metric": "tflops", "value": round(flops / t / 1e12, 2), "unit": "TFLOP/s"},
            {**base, "provider": prov, "metric": "floor_share", "value": round(floor / t, 4), "unit": "ratio"},
            {**base, "provider": prov, "metric": "rel_err_vs_eager", "value": float(f"{err:.3e}"), "unit": "ratio"}]


def _sweep(block, x, base, floor) -> list[dict]:
    """Time tile configs of the grouped experts path on this shape and routing (experts only, router excluded):
    gate/up configs first with the down config fixed, then down configs with the best gate/up block_m."""
    from kernels.moe_experts import ExpertWeights, fused_experts, pick_configs

    with torch.no_grad():
        _, topw, topi = block.gate(x.view(-1, x.shape[-1]))
    ex = block.experts
    w = ExpertWeights(ex.gate_up_proj, ex.down_proj)
    h = x.view(-1, x.shape[-1])
    T, k = topi.shape
    rows, best = [], {}

    def timed(tag: str, cu: TileConfig, cd: TileConfig) -> float | None:
        try:
            with torch.no_grad():
                t = bench(lambda: fused_experts(h, w, topw, topi, configs=(cu, cd), force_path="grouped"),
                          reps=10, warm=2)
        except Exception as err:  # a tile that does not fit shared memory or registers
            print(f"  {tag}: {type(err).__name__}", flush=True)
            return None
        rows.append({**base, "provider": f"sweep {tag}", "metric": "time", "value": round(t * 1e6, 2), "unit": "us"})
        return t

    cu0, cd0 = pick_configs(T, k, w.num_experts)
    for bm in ((32, 64) if T <= 1024 else (64, 128)):
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (3, 4):
                    cu = TileConfig(bm, bn, 64, 8, warps, stages)
                    cd = TileConfig(bm, cd0.block_n, cd0.block_k, 8, cd0.num_warps, cd0.num_stages)
                    t = timed(f"up bm{bm} bn{bn} w{warps} s{stages}", cu, cd)
                    if t is not None and ("up" not in best or t < best["up"][0]):
                        best["up"] = (t, cu)
    cu = best["up"][1]
    for bn in (64, 128, 256):
        for warps in (4, 8):
            for stages in (3, 4):
                for per_slot in (False, True):
                    cd = TileConfig(cu.block_m, bn, 64, 8, warps, stages, per_slot)
                    t = timed(f"down bm{cu.block_m} bn{bn} w{warps} s{stages} {'slot' if per_slot else 'atomic'}",
                              cu, cd)
                    if t is not None and ("down" not in best or t < best["down"][0]):
                        best["down"] = (t, cd)
    print(f"  best: up {best['up'][1]} down {best['down'][1]}: {best['down'][0] * 1e6:.1f} us experts only "
          f"({floor / best['down'][0]:.1%} of the layer floor)", flush=True)
    return rows


def one_block(cfg, impl: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Generator]:
    """A one-layer bf16 model of `cfg` on the GPU with experts implementation `impl`, its MoE block with random
    N(0, 0.02) experts and a skewed router (skew_router), the router's preferred direction u [H], and the
    generator that made them (seeded, so every benchmark sees the same weights)."""
    cfg._experts_implementation = impl
    model = AutoModelForCausalLM.from_config(one_layer(cfg), dtype=torch.bfloat16).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for p in block.experts.parameters():
            p.normal_(0, 0.02, generator=gen)
    u = skew_router(block, cfg.hidden_size, gen)
    return model, block, u, gen


def one_layer(cfg):
    c = cfg.__class__.from_dict(cfg.to_dict())
    c.num_hidden_layers = 1
    c.vocab_size = 128
    c._attn_implementation = "sdpa"
    return c


def set_provider(model, prov: str) -> None:
    if prov == "fused_triton":
        enable_fused_moe(model)
        return
    uninstall_fused_blocks(model)
    for m in model.modules():  # restore stock routers
        if getattr(m, "_fused_spec", None) is not None:
            m.forward = m._stock_forward
            m._fused_spec = None
    model.set_experts_implementation(prov)


def model_rows(shape: str, cfg, stamp: str, gpu: str, batch: int, seq: int) -> list[dict]:
    """Whole-model forward tokens/s per provider, and a dense Llama twin with the same active FFN width."""
    rows = []
    base = dict(kernel="model_forward", shape=f"{shape} ({MODEL_NOTE[shape]})", tokens=batch * seq, gpu=gpu,
                timestamp=stamp)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):  # initialise on the GPU: a CPU init of 7B random weights takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=gen)
    for prov in PROVIDERS:
        set_provider(model, prov)
        with torch.no_grad():
            t = bench(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), reps=5, warm=2)
        rows.append({**base, "provider": prov, "metric": "throughput", "value": round(batch * seq / t),
                     "unit": "tokens/s"})
        print(f"{shape:14s} model {prov:13s} {batch * seq / t:10.0f} tokens/s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    k = cfg.num_experts_per_tok
    ffn = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    dense_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=k * ffn,
                            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                            num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None),
                            max_position_embeddings=4096)
    dense_cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        dense = AutoModelForCausalLM.from_config(dense_cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for n, p in dense.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02, generator=gen)
        t = bench(lambda: dense(input_ids=ids, use_cache=False, logits_to_keep=1), reps=5, warm=2)
    rows.append({**base, "provider": "dense_twin", "metric": "throughput", "value": round(batch * seq / t),
                 "unit": "tokens/s"})
    print(f"{shape:14s} model {'dense_twin':13s} {batch * seq / t:10.0f} tokens/s", flush=True)
    del dense
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/moe_layer.csv")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--no-model", action="store_true", help="skip whole-model forward")
    ap.add_argument("--sweep", action="store_true", help="also time tile configs at T >= 256")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    run = start_run("moe_layer")
    if run is None:
        return 2
    gpu, stamp, peak_flops, peak_bw, rows = run.gpu, run.stamp, run.matmul, run.bandwidth, run.rows
    out = Path(args.out)
    for shape in args.shapes:
        rows += layer_rows(shape, SHAPES[shape](), peak_flops, peak_bw, args.tokens, stamp, gpu, args.sweep)
        write_rows(out, rows)  # after each shape: a run cut short keeps what it measured
    if not args.no_model:
        for shape in args.shapes:
            rows += model_rows(shape, SHAPES[shape](), stamp, gpu, args.batch, args.seq)
            write_rows(out, rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
