"""The decoder's elementwise kernels against transformers' own and torch.compile's: RMSNorm and rotary.

    python -m bench.layer_kernels [--out bench/results/layer_kernels.csv]

Per shape and token count: ours (kernels/rms_norm.py, kernels/rotary.py), `eager` (the model's own code:
Qwen3-MoE's RMSNorm module and `apply_rotary_pos_emb`) and `compiled` (that same code through torch.compile, the
best stock path for elementwise chains), plain calls timed by CUDA events. Rows: time (us), the share of the copy
bandwidth (bytes read and written once / measured copy rate / time) and ours' speedup over the faster stock path.
Shapes: a Qwen3-30B-A3B layer (hidden 2048, 32 query and 4 key heads of 128, whose q/k norms run per head) and a
DeepSeek-V3 hidden norm (7168), at 1, 16, 4096 and 32768 tokens.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import bench, start_run, write_rows


def _norm_cases(tokens: int) -> list[tuple[str, tuple[int, ...], int]]:
    return [(f"rmsnorm H=2048 T={tokens}", (tokens, 2048), 2048),
            (f"rmsnorm per head 32x128 T={tokens}", (tokens, 32, 128), 128),
            (f"rmsnorm H=7168 T={tokens}", (tokens, 7168), 7168)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 4096, 32768])
    ap.add_argument("--out", type=Path, default=Path("bench/results/layer_kernels.csv"))
    args = ap.parse_args(argv)
    run = start_run("layer_kernels")
    if run is None:
        return 2
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    from kernels.rms_norm import rms_norm
    from kernels.rotary import rotary

    rows = list(run.rows)
    dt = torch.bfloat16

    def record(kernel: str, shape: str, tokens: int, times: dict[str, float], nbytes: int) -> None:
        for prov, t in times.items():
            rows.append(run.row(kernel=kernel, provider=prov, shape=shape, tokens=tokens, metric="time",
                                value=round(t * 1e6, 2), unit="us"))
            rows.append(run.row(kernel=kernel, provider=prov, shape=shape, tokens=tokens, metric="bandwidth_share",
                                value=round(nbytes / run.bandwidth / t, 4), unit="ratio"))
        stock = min(t for p, t in times.items() if p != "ours")
        rows.append(run.row(kernel=kernel, provider="ours", shape=shape, tokens=tokens,
                            metric="speedup_vs_best_stock", value=round(stock / times["ours"], 3), unit="x"))
        print(f"{shape:<40} " + "  ".join(f"{p} {t * 1e6:9.1f} us" for p, t in times.items())
              + f"  ours {stock / times['ours']:.2f}x", flush=True)

    with torch.inference_mode():
        for tokens in args.tokens:
            for shape, dims, width in _norm_cases(tokens):
                x = torch.randn(dims, device="cuda", dtype=dt)
                mod = qwen3.Qwen3MoeRMSNorm(width, eps=1e-6).to("cuda", dt)
                mod.weight.normal_(1, 0.1)
                torch._dynamo.reset()  # each case compiled afresh: all share one code object and its recompile limit
                compiled = torch.compile(mod.forward, dynamic=False)
                times = {"ours": bench(lambda: rms_norm(x, mod.weight, 1e-6)), "eager": bench(lambda: mod(x)),
                         "compiled": bench(lambda: compiled(x))}
                record("rms_norm", shape, tokens, times, 2 * x.numel() * x.element_size())
            batch = 16 if tokens >= 2048 else 1
            seq = tokens // batch
            q = torch.randn(batch, seq, 32, 128, device="cuda", dtype=dt).transpose(1, 2)
            k = torch.randn(batch, seq, 4, 128, device="cuda", dtype=dt).transpose(1, 2)
            cos, sin = (torch.randn(batch, seq, 128, device="cuda", dtype=dt) for _ in range(2))
            fn = qwen3.apply_rotary_pos_emb
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
            times = {"ours": bench(lambda: (rotary(q, cos, sin), rotary(k, cos, sin))),
                     "eager": bench(lambda: fn(q, k, cos, sin)), "compiled": bench(lambda: compiled(q, k, cos, sin))}
            record("rotary", f"rotary q 32x128 k 4x128 T={tokens}", tokens, times,
                   2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2)
            write_rows(args.out, rows)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
