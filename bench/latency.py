"""Serving latency of the default teacher and student on one GPU, both decode paths, one run.

    python -m bench.latency [--out bench/results/latency_h100.csv] [--layers 16] [--no-compile]

The models are the default pipeline's shapes with random weights (latency does not depend on the values;
the device has no hub to fetch SmolLM2 from): the teacher is SmolLM2-135M upcycled by `teachers.upcycle` to
4 experts, top-2 (30 layers), and the student is its dense twin (`students.dense_twin`) keeping `--layers`
layers, as `STUDENT=derived keep_layers=top_16` builds it. Both run in bf16 through `eval.latency` with the
GPU settings the pipeline's latency stage uses (prefill at 1x512, 8x2048, 32x512; time to first token at 128
and 2048; decode at batch 1 and 32 on plain `generate` and on a static cache with torch.compile). The
teacher runs twice: transformers' stock MoE path and our fused Triton kernels (`kernels.hf_moe`).

Rows: `kernel` = latency setting, `provider` = teacher_stock | teacher_fused | student, metric = the
setting's median (and p20/p80), plus `speedup` rows (student over each teacher; > 1 is the student faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.common import start_run, write_rows
from eval.latency import LatencySettings, compare_latency, measure_latency
from students.dense_twin import twin_config
from teachers.upcycle import upcycled_config

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)


def _build(config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/latency_h100.csv"))
    ap.add_argument("--layers", type=int, default=16, help="student layers (the default keep_layers=top_16)")
    ap.add_argument("--no-compile", action="store_true", help="skip the static-cache + torch.compile decode rows")
    args = ap.parse_args(argv)
    run = start_run("latency")
    if run is None:
        return 2
    dense = LlamaConfig(**SMOLLM2_135M)
    teacher_cfg = upcycled_config(dense, num_experts=4, top_k=2)
    student_cfg = twin_config(teacher_cfg, list(range(args.layers)), teacher_cfg.intermediate_size)
    settings = LatencySettings.for_device("cuda")
    if args.no_compile:
        settings = dataclasses.replace(settings, static_compile=False)
    results: dict[str, dict] = {}
    for provider, cfg in (("student", student_cfg), ("teacher_stock", teacher_cfg), ("teacher_fused", teacher_cfg)):
        model = _build(cfg)
        if provider == "teacher_fused":
            from kernels.hf_moe import enable_fused_moe

            print(f"fused: {enable_fused_moe(model)}", flush=True)
        results[provider] = measure_latency(model, cfg.vocab_size, settings, torch.device("cuda"))
        for key, e in results[provider].items():
            if e.get("median") is None:
                print(f"{provider} {key}: {e.get('error', 'no value')}", flush=True)
                continue
            shape = f"b{e.get('batch', 0)}xl{e.get('length', 0)}"
            for stat in ("median", "p20", "p80"):
                if e.get(stat) is not None:
                    run.rows.append(run.row(kernel=key, provider=provider, shape=shape, tokens=e.get("length", 0),
                                            metric=f"{e['metric']}_{stat}", value=e[stat], unit=e["metric"]))
            print(f"{provider:14s} {key:22s} {e['median']:.4g} {e['metric']} ({e.get('path', '')})", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        write_rows(args.out, run.rows)
    for teacher in ("teacher_stock", "teacher_fused"):
        for key, row in compare_latency(results[teacher], results["student"]).items():
            if isinstance(row.get("speedup"), (int, float)):
                run.rows.append(run.row(kernel=key, provider=f"student_vs_{teacher}", shape=row.get("path", ""),
                                        tokens=row.get("length", 0), metric="speedup", value=row["speedup"],
                                        unit="x"))
                print(f"speedup vs {teacher:14s} {key:22s} {row['speedup']:.2f}x", flush=True)
    write_rows(args.out, run.rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
