"""The logits stage at a real teacher's size: a full-depth Qwen3-30B-A3B-shaped teacher on one GPU (issue 21).

    python -m bench.teacher_scale [--layers 48] [--sequences 64] [--seq-len 2048] [--batch 4 8 16]
                                  [--top-k 64] [--out bench/results/teacher_scale.csv]

Random bf16 weights (made on the GPU: 61 GB for 48 layers), our fused kernels on (kernels.hf_moe, dispatcher
included), then the stage's own `teachers.logit_generation.generate_logit_cache` writes a real top-k cache of
random token sequences into a temporary folder, once per batch size. Rows per batch size: tokens/s of the whole
stage code (decoder, chunked head and top-k, host copies, the writer thread), tokens/s of the decoder alone
(no head), and the share of the compute limit: tokens/s x FLOPs per token (2 x active parameters + attention)
over the bf16 matmul rate measured at the start of the run.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from bench.common import random_bf16_on_gpu, start_run, write_rows


def qwen3_30b_a3b(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                          tie_word_embeddings=False)


def build(layers: int) -> torch.nn.Module:
    """The teacher in bf16 on the GPU, initialised there (N(0, 0.02) everywhere: speed does not depend on it)."""
    from transformers import AutoModelForCausalLM

    cfg = qwen3_30b_a3b(layers)
    return random_bf16_on_gpu(lambda: AutoModelForCausalLM.from_config(cfg))


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """2 x active parameters (top-k of the routed experts) + causal attention (2 x 2 x layers x S/2 x q width)."""
    from teachers.load import count_parameters

    _, active = count_parameters(model)
    c = model.config
    return 2.0 * active + 2.0 * 2 * c.num_hidden_layers * (seq_len / 2) * c.num_attention_heads * c.head_dim


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/teacher_scale.csv"))
    args = ap.parse_args(argv)
    run = start_run("teacher_scale")
    if run is None:
        return 2
    from kernels.hf_moe import enable_fused_moe
    from logit_cache import CacheMeta, LogitCacheWriter
    from teachers.logit_generation import generate_logit_cache
    from teachers.moe_layout import decoder_module

    model = build(args.layers)
    fused = enable_fused_moe(model)
    vocab = model.config.vocab_size
    seqs = torch.randint(0, vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
    per_token = flops_per_token(model, args.seq_len)
    rows = list(run.rows)
    shape = f"qwen3-30b-a3b {args.layers} layers"
    for batch in args.batch:
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            meta = CacheMeta(k=args.top_k, vocab_size=vocab, seq_len=args.seq_len, teacher_hash="bench",
                             tokenizer_hash="bench", data_hash="bench")
            # A warm-up pass on two batches: Triton compiles and the dispatcher measures outside the timing.
            generate_logit_cache(model, seqs[:2 * batch], LogitCacheWriter(Path(tmp) / "warm", meta, 256),
                                 args.top_k, vocab, batch)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate_logit_cache(model, seqs, LogitCacheWriter(Path(tmp) / "cache", meta, 256), args.top_k, vocab,
                                 batch)
            torch.cuda.synchronize()
            stage = seqs.numel() / (time.perf_counter() - t0)
            decoder = decoder_module(model)
            ids = seqs[:batch].cuda()
            decoder(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, args.sequences, batch):
                decoder(input_ids=seqs[i:i + batch].cuda(), use_cache=False)
            torch.cuda.synchronize()
            forward = seqs.numel() / (time.perf_counter() - t0)
        for name, rate in (("logits_stage", stage), ("decoder_only", forward)):
            rows.append(run.row(kernel="teacher_scale", provider=name, shape=shape, tokens=batch * args.seq_len,
                                metric="tokens_per_s", value=round(rate, 1), unit="tok/s"))
            rows.append(run.row(kernel="teacher_scale", provider=name, shape=shape, tokens=batch * args.seq_len,
                                metric="compute_share", value=round(rate * per_token / run.matmul, 4), unit="ratio"))
        print(f"batch {batch}: logits stage {stage:,.0f} tokens/s ({stage * per_token / run.matmul:.0%} of the "
              f"compute limit), decoder alone {forward:,.0f}", flush=True)
        write_rows(args.out, rows)
        gc.collect()
        torch.cuda.empty_cache()
    rows.append(run.row(kernel="teacher_scale", provider="limit", shape=shape, tokens=0, metric="tokens_per_s",
                        value=round(run.matmul / per_token, 1), unit=f"tok/s ({fused['experts_implementation']})"))
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
