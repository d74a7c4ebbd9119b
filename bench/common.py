"""What every GPU benchmark here shares: CUDA-event timing, the measured ceilings, and the one CSV layout.

Every benchmark writes rows with the columns `CSV_COLUMNS`, so one reader compares them all; ratios and
shares of the floor are rows too, computed in the same run as the times they come from.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import torch

CSV_COLUMNS = ["kernel", "provider", "shape", "tokens", "metric", "value", "unit", "gpu", "timestamp"]


def bench(fn: Callable[[], object], reps: int = 20, warm: int = 3) -> float:
    """Median seconds of fn() by CUDA events, after warm-up."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


def ceilings() -> tuple[float, float]:
    """Measured bf16 matmul FLOP/s (8192^3) and device copy bytes/s (read + write of 2 GiB) on this GPU."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3 / bench(lambda: a @ b, reps=10)
    x = torch.randn(1024**3, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / bench(lambda: y.copy_(x), reps=10)
    del a, b, x, y
    return flops, bw


def write_rows(out: Path, rows: list[dict]) -> None:
    """Write all rows so far, atomically: a run cut short keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
