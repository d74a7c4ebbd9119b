"""The logits stage's head and top-k alone: what the cache costs per token beyond the teacher's decoder (issue 21).

    python -m bench.head_topk [--vocab 151936 49152] [--hidden 2048] [--rows 4096 16384] [--top-k 64]
                              [--out bench/results/head_topk.csv]

Per (vocabulary, rows): the head's matmul alone (bf16, [rows, hidden] x [hidden, vocab]); `torch.topk` alone on
its bf16 product, and `logit_cache.topk.block_topk` (the top-k through block maxima); the stage's selection as it
was first (`logit_cache.topk_from_logits`: float32 copies, a scatter and two logsumexps), as it is
(`logit_cache.topk_select`: block_topk, then one pass of row statistics, `kernels.topk_tail`) and in one read
(`logit_cache.topk.topk_one_read`: every block's maximum and logsumexp, then the k best blocks only); the
row-statistics kernel alone. (At `4e8ddad`, `head_topk_h200.csv`'s `topk_select` rows are the one-read path and
its `topk_two_pass` rows today's `topk_select`.) Each as microseconds per call and tokens/s, and the floor of
each: the matmul at the measured bf16 rate, the selection at one read of the bf16 logits at the measured copy
bandwidth. The outputs of the first selection and today's are compared in the same run (largest log-prob and
tail differences). A 151,936-token vocabulary and hidden 2048 are Qwen3-30B-A3B's, 49,152 SmolLM2's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.common import bench, start_run, write_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 49152])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/head_topk.csv"))
    args = ap.parse_args(argv)
    run = start_run("head_topk")
    if run is None:
        return 2
    from kernels.topk_tail import row_stats
    from logit_cache import topk_from_logits, topk_select
    from logit_cache.topk import block_topk, topk_one_read

    k = args.top_k
    gen = torch.Generator(device="cuda").manual_seed(0)
    for vocab in args.vocab:
        weight = torch.randn(vocab, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for rows in args.rows:
            hidden = torch.randn(rows, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            logits = torch.nn.functional.linear(hidden, weight) * 40  # a spread like a trained head's
            kth = torch.topk(logits, k, dim=-1).values[:, -1].float()
            before, now = topk_from_logits(logits, k), topk_select(logits, k)
            lp_diff = float((before[1] - now[1]).abs().max())
            tail_diff = float((before[2] - now[2]).abs().max())
            read = rows * vocab * logits.element_size()
            floors = {"matmul": 2 * rows * vocab * args.hidden / run.matmul, "select": read / run.bandwidth}
            cases = {"matmul": lambda: torch.nn.functional.linear(hidden, weight),
                     "torch_topk_bf16": lambda: torch.topk(logits, k, dim=-1),
                     "block_topk_bf16": lambda: block_topk(logits, k),
                     "row_stats": lambda: row_stats(logits, kth),
                     "topk_from_logits": lambda: topk_from_logits(logits, k),
                     "topk_select": lambda: topk_select(logits, k),
                     "topk_one_read": lambda: topk_one_read(logits, k)}
            shape = f"V={vocab} H={args.hidden} k={k}"
            line = []
            for name, fn in cases.items():
                t = bench(fn, reps=10, warm=2)
                floor = floors["matmul" if name == "matmul" else "select"]
                run.rows += [run.row(kernel="head_topk", provider=name, shape=shape, tokens=rows, metric="time",
                                     value=round(t * 1e6, 1), unit="us"),
                             run.row(kernel="head_topk", provider=name, shape=shape, tokens=rows, metric="tokens_per_s",
                                     value=round(rows / t), unit="tokens/s"),
                             run.row(kernel="head_topk", provider=name, shape=shape, tokens=rows,
                                     metric="floor_share", value=round(floor / t, 4), unit="ratio")]
                line.append(f"{name} {t * 1e6:.0f} us")
            run.rows += [run.row(kernel="head_topk", provider="topk_select", shape=shape, tokens=rows,
                                 metric="max_abs_diff_logprob_vs_before", value=lp_diff, unit="nats"),
                         run.row(kernel="head_topk", provider="topk_select", shape=shape, tokens=rows,
                                 metric="max_abs_diff_tail_vs_before", value=tail_diff, unit="nats")]
            print(f"{shape} rows={rows}: " + ", ".join(line) + f"; diff lp {lp_diff:.1e} tail {tail_diff:.1e}",
                  flush=True)
            write_rows(args.out, run.rows)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
