"""What `PRESET=h100` is sized on: the speed of its two teacher-heavy steps on one GPU, with random weights.

    python -m bench.preset_probe [--expert-matmul bf16|fp32] [--experts 8] [--seq-len 512] [--out F.json]

The teacher is SmolLM2-135M's shape upcycled to `--experts` experts, top-2 (random weights: speed does not
depend on the values, and the device cannot fetch SmolLM2). Timed:
- continued training (`teachers.continued_training.tune_teacher`, fp32 master weights, bf16 autocast,
  transformers' own MoE path): median tokens/s over the steps after the first two, and peak memory;
- the teacher's forward for the logit cache (bf16, no grad) on transformers' stock path and on our fused
  kernels (`kernels.hf_moe`): tokens/s of each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.latency import SMOLLM2_135M
from teachers.config import TeacherTuneConfig
from teachers.continued_training import tune_teacher
from teachers.upcycle import upcycled_config


def _forward_rate(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 5) -> float:
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    return ids.numel() * repeats / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--expert-matmul", choices=("bf16", "fp32"), default="bf16",
                    help="teacher_tune.expert_matmul: bf16 (teachers/autocast_experts.py) or transformers' fp32")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/preset_probe_h100_<matmul>.json")
    args = ap.parse_args(argv)
    args.out = args.out or Path(f"bench/results/preset_probe_h100_{args.expert_matmul}.json")
    if not torch.cuda.is_available():
        print("bench.preset_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = upcycled_config(LlamaConfig(**SMOLLM2_135M), num_experts=args.experts, top_k=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n = args.batch * (args.steps + 1)
    seqs = torch.randint(0, cfg.vocab_size, (n, args.seq_len), dtype=torch.int32)
    rates: list[float] = []
    tc = TeacherTuneConfig(steps=args.steps, batch_size=args.batch, micro_batch_size=args.micro, warmup_steps=1,
                           router_jitter=0.01, expert_noise=0.01, checkpoint_every=10_000,
                           expert_matmul=args.expert_matmul)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        tune_teacher(model, seqs, tc, Path(tmp), device, log_fn=lambda m, step: rates.append(m["tokens_per_s"]))
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "experts": args.experts,
              "top_k": 2, "expert_matmul": args.expert_matmul, "seq_len": args.seq_len, "batch": args.batch, "micro_batch": args.micro,
              "tune_tokens_per_s": statistics.median(rates[2:]), "tune_tokens_per_s_all": rates,
              "tune_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    model = model.to(torch.bfloat16).eval()
    ids = seqs[:16].long().to(device)
    result["forward_stock_tokens_per_s"] = _forward_rate(model, ids)
    from kernels.hf_moe import enable_fused_moe

    result["fused"] = enable_fused_moe(model)
    result["forward_fused_tokens_per_s"] = _forward_rate(model, ids)
    print(json.dumps(result, indent=1, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
