"""On-policy distillation on GPU: the sampler's two decode paths, and training steps with and without sampling.

    python -m bench.on_policy_decode [--out bench/results/on_policy_decode.csv]

1. A SmolLM2-135M-shaped student (random bf16 weights) continues 16 prompts of 128 tokens by 256 tokens with
   core.sampling.sample_continuations: the default cache, eager, against the static cache with the compiled
   one-token step (the path training uses on GPU). Rows: tokens/s of each (after a warm-up that compiles), and
   how many greedy tokens the two paths agree on (bf16: they may part where two logits tie).
2. distill.trainer.train_student with on_policy_rate=0.5 against a small random Mixtral teacher on our fused
   kernels: the time of a cache step and of an on-policy step, the sampling's share of it, and the losses.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import start_run, write_rows


def student(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg)


def decode_rows(run) -> list[dict]:
    from core.sampling import sample_continuations

    vocab = 49152
    model = student(vocab).to(torch.bfloat16).eval()
    prompts = torch.randint(0, vocab, (16, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows, outs = [], {}
    for name, static in (("eager_dynamic_cache", False), ("static_compiled", True)):
        sample_continuations(model, prompts, 256, vocab, temperature=0, static=static, compiled=static)  # warm/compile
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs[name] = sample_continuations(model, prompts, 256, vocab, temperature=0, static=static, compiled=static)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append(run.row(kernel="on_policy_decode", provider=name, shape="smollm2-135m b16 p128",
                            tokens=16 * 256, metric="tokens_per_s", value=round(16 * 256 / dt, 1), unit="tok/s"))
        print(f"{name}: {16 * 256 / dt:,.0f} tokens/s ({dt:.2f} s)", flush=True)
    a, b = outs["eager_dynamic_cache"][:, 128:], outs["static_compiled"][:, 128:]
    first_diff = [(row_a != row_b).nonzero()[0].item() if (row_a != row_b).any() else 256 for row_a, row_b in zip(a, b)]
    rows.append(run.row(kernel="on_policy_decode", provider="static_compiled", shape="smollm2-135m b16 p128",
                        tokens=16 * 256, metric="greedy_tokens_equal_before_first_difference_mean",
                        value=round(sum(first_diff) / len(first_diff), 1), unit="tokens of 256"))
    print(f"greedy agreement: first difference after {sum(first_diff) / len(first_diff):.1f} tokens on average",
          flush=True)
    return rows


def training_rows(run) -> list[dict]:
    from transformers import MixtralConfig, MixtralForCausalLM

    from distill.config import DistillConfig
    from distill.trainer import train_student
    from kernels.hf_moe import enable_fused_moe
    from logit_cache import topk_from_logits

    vocab, seq = 4096, 512
    torch.manual_seed(0)
    with torch.device("cuda"):
        teacher = MixtralForCausalLM(MixtralConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1024,
                                                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                                                   num_local_experts=8, num_experts_per_tok=2,
                                                   max_position_embeddings=1024)).to(torch.bfloat16).eval()
    fused = enable_fused_moe(teacher)
    stud = student(vocab)
    g = torch.Generator().manual_seed(1)
    data = []
    with torch.no_grad():
        for _ in range(64):
            ids = torch.randint(0, vocab, (seq,), generator=g)
            lg = teacher(input_ids=ids[None].cuda()).logits[0].float().cpu()
            top, lp, tail = topk_from_logits(lg, 64)
            data.append({"input_ids": ids, "topk_ids": top, "topk_logprobs": lp, "tail_logmass": tail})
    cfg = DistillConfig(batch_size=16, micro_batch_size=8, max_steps=8, on_policy_rate=0.5, warmup_steps=1,
                        checkpoint_every=100, lr=3e-4)
    logs: list[dict] = []
    train_student(stud, data, cfg, Path("/tmp/on_policy_bench_ckpt"), vocab, torch.device("cuda"),
                  lambda m, step: logs.append({"step": step, **m}), teacher=teacher)
    rows = []
    for r in logs:
        kind = "on_policy" if r.get("on_policy") else "cache"
        print(f"step {r['step']} {kind}: loss {r['loss']:.3f} tokens/s {r['tokens_per_s']:,.0f}"
              + (f" sample {r['sample_s']:.2f}s" if "sample_s" in r else ""), flush=True)
        for metric in ("loss", "tokens_per_s", "sample_s"):
            if metric in r:
                rows.append(run.row(kernel="on_policy_train", provider=kind, shape=f"smollm2-135m seq{seq} b16",
                                    tokens=r["step"], metric=metric, value=round(float(r[metric]), 4), unit=""))
    rows.append(run.row(kernel="on_policy_train", provider="teacher", shape="mixtral-small", tokens=0,
                        metric="experts_implementation", value=1, unit=str(fused.get("experts_implementation"))))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/on_policy_decode.csv"))
    ap.add_argument("--skip-decode", action="store_true", help="only the training steps")
    args = ap.parse_args(argv)
    run = start_run("on_policy_decode")
    if run is None:
        return 2
    rows = list(run.rows)
    if not args.skip_decode:
        rows += decode_rows(run)
        write_rows(args.out, rows)
    rows += training_rows(run)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
