"""What every GPU benchmark here shares: CUDA-event timing, the measured ceilings, and the one CSV layout.

Every benchmark writes rows with the columns `CSV_COLUMNS`, so one reader compares them all; ratios and
shares of the floor are rows too, computed in the same run as the times they come from.
"""
from __future__ import annotations

import csv
import datetime as dt
import sys
from dataclasses import dataclass, field
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


def random_bf16_on_gpu(make: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """`make()`'s module built in bf16 directly on the GPU (a 30B-parameter teacher never exists in float32 or on
    the host), in eval mode, every parameter N(0, 0.02) from a seeded generator: speed does not depend on the
    values, and every benchmark run sees the same ones."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            module = make().eval()
    finally:
        torch.set_default_dtype(dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=gen)
    return module


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


@dataclass
class BenchRun:
    """One benchmark invocation: the GPU, a timestamp, the ceilings measured at its start, and its rows."""
    gpu: str
    stamp: str
    matmul: float  # bf16 FLOP/s
    bandwidth: float  # bytes/s
    rows: list[dict] = field(default_factory=list)

    def row(self, **kw: object) -> dict:
        return {"gpu": self.gpu, "timestamp": self.stamp, **kw}


def start_run(name: str) -> BenchRun | None:
    """Measure the ceilings and start the rows with them; None (and a message) when there is no GPU."""
    if not torch.cuda.is_available():
        print(f"bench.{name} needs a CUDA GPU", file=sys.stderr)
        return None
    run = BenchRun(torch.cuda.get_device_name(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   *ceilings())
    print(f"{run.gpu}: bf16 matmul {run.matmul / 1e12:.0f} TFLOP/s, copy {run.bandwidth / 1e12:.2f} TB/s", flush=True)
    run.rows += [run.row(kernel="ceiling", provider="torch", shape="matmul 8192^3 bf16", tokens=0, metric="rate",
                         value=round(run.matmul / 1e12, 1), unit="TFLOP/s"),
                 run.row(kernel="ceiling", provider="torch", shape="copy 2 GiB", tokens=0, metric="bandwidth",
                         value=round(run.bandwidth / 1e12, 3), unit="TB/s")]
    return run
