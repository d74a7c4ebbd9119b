"""The logits stage at a real teacher's size: a full-depth Qwen3-30B-A3B-shaped teacher on one GPU (issue 21).

    python -m bench.teacher_scale [--layers 48] [--sequences 64] [--seq-len 2048] [--batch 4 8 16]
                                  [--top-k 64] [--out bench/results/teacher_scale.csv] [--profile]
                                  [--variants all moe-only] [--selections two-pass one-read ...]

Random bf16 weights (made on the GPU: 61 GB for 48 layers), our fused kernels on (kernels.hf_moe, dispatcher
included; variant `all`: also our RMSNorm and rotary kernels, as the stage runs; `moe-only`: router and experts
only, the norms and rotary embedding transformers' own), then the stage's own `teachers.logit_generation.generate_logit_cache` writes a real top-k cache of
random token sequences into a temporary folder, once per batch size. Rows per batch size: tokens/s of the whole
stage code (decoder, chunked head and top-k, host copies, the writer thread), tokens/s of the decoder alone
(no head), and the share of the compute limit: tokens/s x FLOPs per token (2 x active parameters + attention)
over the bf16 matmul rate measured at the start of the run.

`--profile` adds, for the largest batch and each variant, where the GPU time of one batch goes: the decoder and the head's top-k
profiled apart, every kernel's time summed by its name and by a coarse part of the model (`kernel_part`), as
rows `teacher_profile` (ms per batch), the 25 largest kernels printed.
"""
from __future__ import annotations

import argparse
import contextlib
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


# Which of our kernels a variant turns on (enable_fused_moe's switches); rows name the variant unless it is "all".
VARIANTS = {"all": {}, "moe-only": {"norms": False, "rotary": False}}

# Coarse parts of the model by kernel name, first match wins (lower-case substrings). cuBLAS's GEMMs in the
# decoder are the attention projections (and the shared expert's, where a model has one); in the head, its matmul.
PARTS = (("attention core", ("flash", "fmha", "attention", "sdpa")),
         ("experts: our grouped GEMMs", ("gate_up_kernel", "down_kernel", "gate_up_tma", "down_tma")),
         ("experts: align and sort", ("_align", "_histogram_kernel", "_prefix_kernel", "_scatter_kernel")),
         ("router", ("_router",)),
         ("top-k", ("topk", "radix", "sort", "select")),
         ("row statistics", ("_row_stats",)),
         ("cuBLAS GEMMs", ("gemm", "nvjet", "xmma", "cutlass", "matmul")),
         ("normalisation", ("norm",)),
         ("copies and casts", ("copy", "cat", "index", "gather", "scatter")))


def kernel_part(name: str) -> str:
    """The coarse part of the model a CUDA kernel's name belongs to (PARTS), else "other elementwise"."""
    low = name.lower()
    for part, keys in PARTS:
        if any(k in low for k in keys):
            return part
    return "other elementwise"


def profile_kernels(fn) -> dict[str, float]:
    """Milliseconds of GPU time per kernel name over one call of fn (after it ran once unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            out[evt.key] = out.get(evt.key, 0.0) + us / 1e3
    return out


def profile_rows(run, model: torch.nn.Module, ids: torch.Tensor, top_k: int, shape: str, suffix: str = ""
                 ) -> list[dict]:
    """teacher_profile rows for one batch `ids` [B, S] on the GPU: ms per part for the decoder and the head."""
    from logit_cache import topk_from_hidden
    from teachers.moe_layout import decoder_module

    decoder = decoder_module(model)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state.reshape(-1, model.config.hidden_size)
    weight = model.get_output_embeddings().weight
    stages = {"decoder": lambda: decoder(input_ids=ids, use_cache=False),
              "head": lambda: topk_from_hidden(hidden, weight, top_k, model.config.vocab_size)}
    rows = []
    for stage, fn in stages.items():
        kernels = profile_kernels(fn)
        parts: dict[str, float] = {}
        for name, ms in kernels.items():
            parts[kernel_part(name)] = parts.get(kernel_part(name), 0.0) + ms
        total = sum(kernels.values())
        print(f"{stage}{suffix}: {total:.1f} ms of GPU time per batch of {ids.numel()} tokens", flush=True)
        for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {part:<28} {ms:9.2f} ms  {ms / total:6.1%}", flush=True)
            rows.append(run.row(kernel="teacher_profile", provider=f"{stage}{suffix}: {part}", shape=shape,
                                tokens=ids.numel(), metric="time", value=round(ms, 3), unit="ms"))
        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
            print(f"    {ms:9.2f} ms  {name[:150]}", flush=True)
    return rows


def _time_batches(run, model: torch.nn.Module, seqs: torch.Tensor, args: argparse.Namespace, shape: str,
                  per_token: float, suffix: str) -> list[dict]:
    """Rows of the stage's and the decoder's tokens/s at each batch size of args.batch (providers end in suffix)."""
    from logit_cache import CacheMeta, LogitCacheWriter
    from teachers.logit_generation import generate_logit_cache
    from teachers.moe_layout import decoder_module

    vocab = model.config.vocab_size
    rows = []
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
            decoder(input_ids=seqs[:batch].cuda(), use_cache=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, args.sequences, batch):
                decoder(input_ids=seqs[i:i + batch].cuda(), use_cache=False)
            torch.cuda.synchronize()
            forward = seqs.numel() / (time.perf_counter() - t0)
        for name, rate in (("logits_stage", stage), ("decoder_only", forward)):
            rows.append(run.row(kernel="teacher_scale", provider=name + suffix, shape=shape,
                                tokens=batch * args.seq_len, metric="tokens_per_s", value=round(rate, 1),
                                unit="tok/s"))
            rows.append(run.row(kernel="teacher_scale", provider=name + suffix, shape=shape,
                                tokens=batch * args.seq_len, metric="compute_share",
                                value=round(rate * per_token / run.matmul, 4), unit="ratio"))
        print(f"batch {batch}{suffix}: logits stage {stage:,.0f} tokens/s ({stage * per_token / run.matmul:.0%} of "
              f"the compute limit), decoder alone {forward:,.0f}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# The head's top-k selection the stage runs (logit_cache.topk.topk_select), by name: the two-pass path it ships
# with, or the one-read path (faster alone, kernels/NOTES.md) swapped in for the run.
SELECTIONS = {"two-pass": "topk_two_pass", "one-read": "topk_one_read"}


@contextlib.contextmanager
def _selection(name: str):
    """logit_cache.topk.topk_select as SELECTIONS[name] inside the block (the stage looks it up at each call)."""
    from logit_cache import topk

    keep = topk.topk_select
    topk.topk_select = getattr(topk, SELECTIONS[name])
    try:
        yield
    finally:
        topk.topk_select = keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/teacher_scale.csv"))
    ap.add_argument("--profile", action="store_true", help="also the GPU time of one batch by part of the model")
    ap.add_argument("--variants", nargs="+", default=["all"], choices=sorted(VARIANTS))
    ap.add_argument("--selections", nargs="+", default=["two-pass"], choices=sorted(SELECTIONS),
                    help="the head's top-k selection, each in turn (repeat names to interleave runs)")
    args = ap.parse_args(argv)
    run = start_run("teacher_scale")
    if run is None:
        return 2
    from kernels.hf_moe import enable_fused_moe
    from kernels.hf_norms import uninstall_fused_norms
    from kernels.hf_rotary import uninstall_fused_rotary

    model = build(args.layers)
    seqs = torch.randint(0, model.config.vocab_size, (args.sequences, args.seq_len),
                         generator=torch.Generator().manual_seed(0))
    per_token = flops_per_token(model, args.seq_len)
    rows = list(run.rows)
    shape = f"qwen3-30b-a3b {args.layers} layers"
    for variant in args.variants:
        uninstall_fused_norms(model)
        uninstall_fused_rotary(model)
        fused = enable_fused_moe(model, **VARIANTS[variant])
        print(f"variant {variant}: {fused}", flush=True)
        for selection in args.selections:
            suffix = ("" if variant == "all" else f" ({variant})") + \
                ("" if selection == "two-pass" else f" [{selection}]")
            with _selection(selection):
                rows += _time_batches(run, model, seqs, args, shape, per_token, suffix)
            write_rows(args.out, rows)
        suffix = "" if variant == "all" else f" ({variant})"
        if args.profile:
            with torch.inference_mode():
                rows += profile_rows(run, model, seqs[:max(args.batch)].cuda(), args.top_k, shape, suffix)
        write_rows(args.out, rows)
    rows.append(run.row(kernel="teacher_scale", provider="limit", shape=shape, tokens=0, metric="tokens_per_s",
                        value=round(run.matmul / per_token, 1), unit=f"tok/s ({fused['experts_implementation']})"))
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
