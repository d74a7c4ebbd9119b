"""Student training throughput through our trainer, fused loss on, one GPU run.

    python -m bench.train_throughput [--out bench/results/train_throughput_h100.csv] [--steps 8]

Two dense students with random weights: a SmolLM2-135M-shaped one and a ~1.2B Llama-3.2-1B-shaped one,
trained by distill.trainer.train_student (fp32 master weights, bf16 autocast, AdamW, clipping, the fused
top-k KD loss against a synthetic top-k cache with k = 64) at sequence length 2048. The first steps are
warm-up (allocator, cuBLAS heuristics) and are dropped; the rest give tokens/s, MFU (model FLOPs per
token from distill/throughput.py over the datasheet bf16 peak) and the share of the bf16 matmul rate
measured in this run, and peak memory. Checkpointing is pushed past the run so that disk speed is not
timed. With --unfused the same students also train on the plain loss, for the ratio.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import start_run, write_rows
from distill.config import DistillConfig
from distill.throughput import flops_per_token, peak_flops
from distill.trainer import train_student

STUDENTS = {
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True, max_position_embeddings=2048),
    "llama-1b": lambda: LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                                    max_position_embeddings=2048),
}
MICRO = {"smollm2-135m": 16, "llama-1b": 8}  # sequences per micro-batch (fits 80 GB with room)
TOP_K = 64


def synthetic_cache(n: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """n sequences of random tokens with a peaked random top-k teacher distribution."""
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        vals = torch.randn(seq, TOP_K, generator=g).sort(-1, descending=True).values * 2
        lp = torch.log_softmax(torch.cat([vals, torch.zeros(seq, 1)], -1), -1)
        items.append({"input_ids": torch.randint(0, vocab, (seq,), generator=g),
                      "topk_ids": torch.randint(0, vocab, (seq, TOP_K), generator=g),
                      "topk_logprobs": lp[:, :TOP_K].contiguous(), "tail_logmass": lp[:, TOP_K].contiguous()})
    return items


def run_one(name: str, seq: int, steps: int, fused: str, warm: int, compile_: bool) -> dict[str, float]:
    cfg_model = STUDENTS[name]()
    micro = MICRO[name]
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg_model)
    data = synthetic_cache(micro * 2, seq + 1, cfg_model.vocab_size)
    cfg = DistillConfig(batch_size=micro * 2, micro_batch_size=micro, epochs=steps, max_steps=steps, warmup_steps=2,
                        checkpoint_every=10**9, fused_loss=fused, ce_weight=0.5,
                        compile="on" if compile_ else "off")
    logs: list[dict] = []
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        # The last step always checkpoints; it is timed before the save, so the save does not count.
        train_student(model, data, cfg, Path(tmp), cfg_model.vocab_size, torch.device("cuda"),
                      lambda m, step: logs.append(m))
    timed = logs[warm:]
    tps = sum(m["tokens_per_s"] for m in timed) / len(timed)
    out = {"tokens_per_s": tps, "mfu": sum(m["mfu"] for m in timed) / len(timed),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3,
           "flops_per_token": flops_per_token(model, seq), "params": sum(p.numel() for p in model.parameters())}
    del model, data
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/train_throughput.csv")
    ap.add_argument("--students", nargs="*", default=list(STUDENTS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--unfused", action="store_true", help="also train with the plain (unfused) loss")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both",
                    help="torch.compile the student's decoder (distill.compile)")
    args = ap.parse_args(argv)
    run = start_run("train_throughput")
    if run is None:
        return 2
    gpu, stamp, matmul, rows = run.gpu, run.stamp, run.matmul, run.rows
    peak = peak_flops(torch.device("cuda"))
    print(f"datasheet bf16 peak {(peak or float('nan')) / 1e12:.0f} TFLOP/s (MFU is against it)", flush=True)
    out = Path(args.out)
    for name in args.students:
        compiles = {"off": [False], "on": [True], "both": [True, False]}[args.compile]
        # Most telling first: a run cut short by a time limit keeps the fused-loss rows.
        variants = [("on", c) for c in compiles] + ([("off", c) for c in reversed(compiles)] if args.unfused else [])
        for fused, compile_ in variants:
            prov = ("trainer_fused_loss" if fused == "on" else "trainer_plain_loss") + ("+compile" if compile_ else "")
            shape = f"{name} S={args.seq} micro={MICRO[name]} accum=2"
            try:
                r = run_one(name, args.seq, args.steps, fused, args.warm, compile_)
            except torch.OutOfMemoryError:
                print(f"{name} {prov}: out of memory", flush=True)
                rows.append(dict(kernel="train", provider=prov, shape=shape, tokens=args.seq * MICRO[name] * 2,
                                 metric="oom", value=1, unit="bool", gpu=gpu, timestamp=stamp))
                gc.collect()
                torch.cuda.empty_cache()
                continue
            share = r["tokens_per_s"] * r["flops_per_token"] / matmul
            print(f"{name:14s} {prov:20s} {r['params'] / 1e6:7.0f}M params  {r['tokens_per_s']:9.0f} tok/s  "
                  f"MFU {r['mfu']:.1%}  of measured matmul {share:.1%}  peak {r['peak_memory_gib']:.1f} GiB",
                  flush=True)
            base = dict(kernel="train", provider=prov, shape=shape, tokens=args.seq * MICRO[name] * 2, gpu=gpu,
                        timestamp=stamp)
            rows += [{**base, "metric": "tokens_per_s", "value": round(r["tokens_per_s"]), "unit": "tok/s"},
                     {**base, "metric": "mfu", "value": round(r["mfu"], 4), "unit": "ratio"},
                     {**base, "metric": "share_of_measured_matmul", "value": round(share, 4), "unit": "ratio"},
                     {**base, "metric": "peak_memory", "value": round(r["peak_memory_gib"], 2), "unit": "GiB"},
                     {**base, "metric": "params", "value": r["params"], "unit": "count"}]
            write_rows(out, rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
