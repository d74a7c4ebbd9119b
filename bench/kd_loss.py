"""The fused linear + top-k KD loss against plain PyTorch (and Liger-Kernel when importable), one GPU run.

    python -m bench.kd_loss [--out bench/results/kd_loss_h100.csv] [--tokens 16384] [--hidden 2048]

Forward plus backward from the student's final hidden states h [N, H] and output weight W [V, H] (bf16),
at N = 16,384 tokens, H = 2048, V in {151,936, 50,304}. Providers:
- fused_triton: ours (distill/fused_linear_kd.py), teacher as a top-k cache (k = 64), forward KL + 0.5 CE;
- torch_topk: the same loss on materialised logits, plain PyTorch (logits = h W^T, then kd_losses);
- torch_full: the plain loss of ../shared/BASELINES.md (log_softmax of both, forward KL) on logits = h W^T
  against full teacher logits, which are an input here as they would be for an online teacher;
- liger_fused_linear_jsd: Liger's fused linear JSD (beta 0.5), which takes the teacher's hidden states and
  weight and so also computes the teacher's logits; it is there as a reference point, not the same loss.
Rows: time (us), TFLOP/s (6 N H V per fwd+bwd, the three GEMMs), share of the floor, extra peak memory
beyond the inputs (GiB), and our speed and memory ratios against each other provider; for the first
vocabulary also our CUDA kernel time by kind (GEMMs, the two row kernels, the rest; torch profiler) and
our time at several chunk sizes. The floor is
max(6 N H V / measured bf16 matmul rate, bytes / measured copy bandwidth); at these shapes the GEMMs set it.
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Callable

import torch

from bench.common import bench, start_run, write_rows
from distill.fused_linear_kd import fused_linear_topk_kd
from distill.kd_losses import KDLossSpec, topk_kd_loss

VOCABS = [151936, 50304]
TOP_K = 64
SPEC = KDLossSpec("forward_kl", kd_weight=1.0, ce_weight=0.5)
GiB = 1024**3


def _inputs(n: int, h: int, v: int, full_teacher: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = (torch.randn(n, h, device="cuda", generator=g) / h**0.25).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) / h**0.25).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    out = {"hidden": hid, "weight": w, "labels": labels}
    if full_teacher:
        out["teacher_logits"] = (torch.randn(n, v, device="cuda", generator=g) * 2).bfloat16()
    else:
        # Teacher top-k as the cache stores it: ids, log-probs and the log of the remaining mass.
        vals, ids = torch.randn(n, v, device="cuda", generator=g).topk(TOP_K, -1)
        lp = torch.log_softmax(torch.cat([vals * 2, torch.zeros(n, 1, device="cuda")], -1), -1)
        out.update(topk_ids=ids, topk_logprobs=lp[:, :TOP_K].contiguous(), tail_logmass=lp[:, TOP_K].contiguous())
    return out


def _providers() -> dict[str, tuple[bool, Callable[[dict], torch.Tensor]]]:
    """name -> (needs full teacher logits, step(inputs) returning the loss after backward)."""
    def fused(x: dict) -> torch.Tensor:
        out = fused_linear_topk_kd(x["hidden"], x["weight"], x["labels"], x["topk_ids"], x["topk_logprobs"],
                                   x["tail_logmass"], SPEC)
        out["loss"].backward()
        return out["loss"]

    def torch_topk(x: dict) -> torch.Tensor:
        logits = x["hidden"] @ x["weight"].t()
        out = topk_kd_loss(logits, x["labels"], x["topk_ids"], x["topk_logprobs"], x["tail_logmass"], SPEC)
        out["loss"].backward()
        return out["loss"]

    def torch_full(x: dict) -> torch.Tensor:
        logits = x["hidden"] @ x["weight"].t()
        lq = torch.log_softmax(logits.float(), -1)
        lp = torch.log_softmax(x["teacher_logits"].float(), -1)
        loss = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="batchmean")
        loss.backward()
        return loss

    provs: dict[str, tuple[bool, Callable]] = {"fused_triton": (False, fused), "torch_topk": (False, torch_topk),
                                              "torch_full": (True, torch_full)}
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception as e:  # noqa: BLE001 - optional: any import failure just drops the provider
        print(f"liger-kernel not importable ({type(e).__name__}: {e}); skipping it", flush=True)
        return provs
    jsd = LigerFusedLinearJSD(jsd_beta=0.5)

    def liger(x: dict) -> torch.Tensor:
        loss = jsd(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"])
        loss.backward()
        return loss
    provs["liger_fused_linear_jsd"] = (False, liger)
    return provs


def _measure(step: Callable[[dict], torch.Tensor], x: dict) -> tuple[float, float, float]:
    """(median seconds, extra peak bytes beyond the inputs, loss value) of one forward + backward."""
    for t in (x["hidden"], x["weight"]):
        t.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step(x).item()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return bench(lambda: step(x), reps=10, warm=2), peak, loss


def shape_rows(n: int, hidden: int, v: int, peak_flops: float, peak_bw: float, gpu: str, stamp: str) -> list[dict]:
    shape = f"N={n} H={hidden} V={v} bf16 k={TOP_K}"
    flops = 6.0 * n * hidden * v
    # Bytes no implementation can avoid: read h, W and the teacher's top-k; write dL/dh and dL/dW.
    floor = max(flops / peak_flops, (2 * (2 * n * hidden + 2 * v * hidden) + n * TOP_K * 12) / peak_bw)
    base = dict(kernel="kd_loss", shape=shape, tokens=n, gpu=gpu, timestamp=stamp)
    rows, results = [], {}
    for name, (full, step) in _providers().items():
        x = _inputs(n, hidden, v, full)
        if name.startswith("liger"):
            x["teacher_hidden"] = x["hidden"].detach().clone()
            x["teacher_weight"] = (x["weight"].detach() * 1.1).contiguous()
        try:
            t, peak, loss = _measure(step, x)
        except torch.OutOfMemoryError:
            print(f"  {name:24s} out of memory", flush=True)
            rows.append({**base, "provider": name, "metric": "oom", "value": 1, "unit": "bool"})
            del x
            continue
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        results[name] = (t, peak, loss)
        print(f"  {name:24s} {t * 1e3:8.2f} ms  {flops / t / 1e12:6.1f} TFLOP/s  floor {floor / t:5.1%}  "
              f"extra peak {peak / GiB:6.2f} GiB  loss {loss:.4f}", flush=True)
        rows += [{**base, "provider": name, "metric": "time", "value": round(t * 1e6, 1), "unit": "us"},
                 {**base, "provider": name, "metric": "tflops", "value": round(flops / t / 1e12, 1), "unit": "TFLOP/s"},
                 {**base, "provider": name, "metric": "floor_share", "value": round(floor / t, 4), "unit": "ratio"},
                 {**base, "provider": name, "metric": "extra_peak_memory", "value": round(peak / GiB, 3),
                  "unit": "GiB"}]
        del x
    if "fused_triton" in results:
        t0, m0, l0 = results["fused_triton"]
        for other, (t, m, loss) in results.items():
            if other == "fused_triton":
                continue
            rows += [{**base, "provider": "fused_triton", "metric": f"speedup_vs_{other}", "value": round(t / t0, 3),
                      "unit": "x"},
                     {**base, "provider": "fused_triton", "metric": f"memory_share_of_{other}",
                      "value": round(m0 / m, 4), "unit": "ratio"}]
        if "torch_topk" in results:  # same loss, same inputs: the values must agree
            rows.append({**base, "provider": "fused_triton", "metric": "rel_err_vs_torch_topk",
                         "value": abs(l0 - results["torch_topk"][2]) / abs(results["torch_topk"][2]), "unit": "ratio"})
    return rows


def breakdown_rows(n: int, hidden: int, v: int, chunk_mib: list[int], gpu: str, stamp: str) -> list[dict]:
    """Where the fused loss's time goes (CUDA kernel time by kind, torch profiler) and how it depends on the
    chunk size (DEFAULT_CHUNK_BYTES)."""
    from torch.profiler import ProfilerActivity, profile

    from distill import fused_linear_kd

    x = _inputs(n, hidden, v, False)

    def step() -> None:
        out = fused_linear_topk_kd(x["hidden"], x["weight"], x["labels"], x["topk_ids"], x["topk_logprobs"],
                                   x["tail_logmass"], SPEC)
        out["loss"].backward()
    base = dict(kernel="kd_loss", provider="fused_triton", shape=f"N={n} H={hidden} V={v} bf16 k={TOP_K}",
                tokens=n, gpu=gpu, timestamp=stamp)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kinds = {"gemm": 0.0, "row_lse": 0.0, "rest_grad": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        name = ev.key.lower()
        kind = ("row_lse" if "_row_lse_kernel" in name else "rest_grad" if "_rest_grad_kernel" in name
                else "gemm" if any(t in name for t in ("gemm", "nvjet", "cutlass", "sm90_xmma")) else "other")
        kinds[kind] += us
    rows = [{**base, "metric": f"kernel_time_{k}", "value": round(us, 1), "unit": "us"} for k, us in kinds.items()]
    print("  kernel time: " + ", ".join(f"{k} {us / 1e3:.1f} ms" for k, us in kinds.items()), flush=True)
    default = fused_linear_kd.DEFAULT_CHUNK_BYTES
    try:
        for mib in chunk_mib:
            fused_linear_kd.DEFAULT_CHUNK_BYTES = mib * 1024**2
            t = bench(step, reps=5, warm=1)
            print(f"  chunk {mib:5d} MiB: {t * 1e3:.2f} ms", flush=True)
            rows.append({**base, "metric": f"time_chunk_{mib}MiB", "value": round(t * 1e6, 1), "unit": "us"})
    finally:
        fused_linear_kd.DEFAULT_CHUNK_BYTES = default
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/kd_loss.csv")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocabs", nargs="*", type=int, default=VOCABS)
    ap.add_argument("--chunk-mib", nargs="*", type=int, default=[256, 1024, 2048],
                    help="chunk sizes timed in the breakdown of the first vocabulary (none: skip the breakdown)")
    args = ap.parse_args(argv)
    run = start_run("kd_loss")
    if run is None:
        return 2
    gpu, stamp, peak_flops, peak_bw, rows = run.gpu, run.stamp, run.matmul, run.bandwidth, run.rows
    out = Path(args.out)
    for v in args.vocabs:
        print(f"N={args.tokens} H={args.hidden} V={v}", flush=True)
        rows += shape_rows(args.tokens, args.hidden, v, peak_flops, peak_bw, gpu, stamp)
        if v == args.vocabs[0] and args.chunk_mib:
            rows += breakdown_rows(args.tokens, args.hidden, v, args.chunk_mib, gpu, stamp)
        write_rows(out, rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
