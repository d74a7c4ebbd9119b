"""Latency and memory of one causal LM: prefill throughput, time to first token, time per output token.

Every number says which path produced it (`generate` with a dynamic cache; `static_compile`: a static cache
with the decode step compiled by `generate` itself; `graph`: greedy decode replaying one CUDA graph per step,
`eval.graph_decode`), because at batch 1 both teacher and student are bound by Python and launch overhead and
the path changes the answer more than the model does.

Timing: CUDA events on GPU (the host may run ahead of the device), `time.perf_counter` on CPU. Each
workload runs `warmup` untimed times, then `repeats` timed times; we report median, p20 and p80 of the
per-run values. Python's garbage collector is off during each timed call (as `timeit` does): a collection inside
one decode step would be charged to that model. Batch-1 settings are bound by the host, so each model's entries
also carry a host probe (`host_probe_us`: a fixed loop of tiny device ops, timed just before the model) and the
other Python threads alive then: a student and a teacher timed under different host conditions show it there.

With `static_compile` or `graph_decode`, `decode_best_b<N>` is each model at its fastest decode path, as
someone serving it would choose.

Memory: weight bytes are the sum of parameter bytes. Peak memory is the extra memory over what was resident
before a workload (the weights of every loaded model included), so that teacher and student compare fairly
even when both sit in one process: `torch.cuda.max_memory_allocated` on GPU, and on CPU the process RSS
sampled every 10 ms by a background thread during the warm-up runs (coarse: glibc keeps freed pages, so a workload that
fits in memory freed by an earlier one shows a delta near zero).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import psutil
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from eval.graph_decode import GraphDecoder

# Direction of each metric; compare_latency turns it into a speedup that is > 1 when the student is better.
HIGHER_IS_BETTER = {"tokens_per_s": True, "ms_per_token": False, "ms": False, "bytes": False}

# The speedup a report leads with, first present wins: batch-1 decode with each model on its fastest decode path
# (where two or more paths were timed), else on plain generate.
HEADLINE_SETTINGS = ("decode_best_b1", "decode_b1")


@dataclass
class LatencySettings:
    """What to time. The defaults fit a 2-core CPU: teacher plus student of 135M-400M parameters in < 60 s.

    prefill: (batch, length) pairs for prefill throughput.
    ttft_lengths: prompt lengths for time to first token, always at batch 1.
    decode_batches: batch sizes for time per output token.
    decode_prompt_len / decode_new_tokens: prompt length and number of generated tokens for decode.
    static_compile: also time the static-cache + torch.compile decode path (only sensible on GPU).
    graph_decode: also time greedy decode with each step replayed from one CUDA graph (eval.graph_decode: the
        model's own time per token, without generate's per-token loop; GPU only).
    """

    # Sized on the 2-core dev box (fp32, 1 thread): a 360M Llama prefills ~50 tokens/s and decodes at
    # ~0.19 s/token (batch 1) and ~0.4 s/step (batch 4); batch-4 decode and prefill dominate the total.
    prefill: tuple[tuple[int, int], ...] = ((1, 64), (4, 32))
    ttft_lengths: tuple[int, ...] = (32,)
    decode_batches: tuple[int, ...] = (1, 4)
    decode_prompt_len: int = 16
    decode_new_tokens: int = 8
    repeats: int = 3
    warmup: int = 1
    static_compile: bool = False
    graph_decode: bool = False
    seed: int = 0

    @classmethod
    def for_device(cls, device: str | torch.device) -> "LatencySettings":
        """CPU defaults on a CPU device; on a GPU the sizes of BASELINES.md (batch 1 and 32, 128-token prompt,
        64 new tokens) plus the static-cache + compile path and the CUDA-graph decode path."""
        if torch.device(device).type != "cuda":
            return cls()
        return cls(
            prefill=((1, 512), (8, 2048), (32, 512)),
            ttft_lengths=(128, 2048),
            decode_batches=(1, 32),
            decode_prompt_len=128,
            decode_new_tokens=64,
            repeats=5,
            warmup=2,
            static_compile=True,
            graph_decode=True,
        )


class _RssSampler:
    """Peak process RSS above a baseline, sampled by a daemon thread (CPU substitute for max_memory_allocated)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self._proc = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval_s)

    def __enter__(self) -> "_RssSampler":
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        # One last reading, in case the workload ended between two samples.
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak - self.base)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Garbage collection off for the duration (as `timeit` times), restored after; what piles up meanwhile is
    collected after the timed call, outside it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Timer:
    """Times callables on `device` in seconds; `run` also reports the peak memory they added."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def seconds(self, fn: Callable[[], object]) -> float:
        """One timed call of `fn`, with the garbage collector off (warm-ups and compiles keep it on)."""
        with _no_gc():
            if self.is_cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000.0
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    def run(self, fn: Callable[[], object], warmup: int, repeats: int) -> tuple[list[float], int]:
        """Warm-up then timed runs of `fn`. Returns (seconds per timed run, peak extra bytes over all runs)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(warmup):
                fn()
            times = [self.seconds(fn) for _ in range(repeats)]
            return times, max(0, torch.cuda.max_memory_allocated(self.device) - base)
        # The sampler thread slows a 2-thread OpenMP forward by ~15% (it preempts a worker), so memory is
        # read during the warm-up runs and the timed runs go without it; with no warm-up it covers those.
        with _RssSampler() as sampler:
            for _ in range(warmup):
                fn()
            times = [] if warmup else [self.seconds(fn) for _ in range(repeats)]
        if warmup:
            times = [self.seconds(fn) for _ in range(repeats)]
        return times, sampler.extra_bytes


def _entry(
    values: list[float], metric: str, path: str, batch: int, length: int, peak_extra: int | None, **extra: object
) -> dict:
    """One result entry: median, p20, p80 of the per-run values in `metric` units."""
    p20, median, p80 = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), [20, 50, 80]))
    out = {
        "metric": metric,
        "median": median,
        "p20": p20,
        "p80": p80,
        "n": len(values),
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "path": path,
        "batch": batch,
        "length": length,
    }
    if peak_extra is not None:
        out["peak_extra_bytes"] = int(peak_extra)
    out.update(extra)
    return out


def _failed(metric: str, path: str, batch: int, length: int, reason: str) -> dict:
    """Entry for a path that could not run: no numbers, the reason instead (compare_latency skips it)."""
    return {
        "metric": metric,
        "median": None,
        "p20": None,
        "p80": None,
        "n": 0,
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "path": path,
        "batch": batch,
        "length": length,
        "error": reason,
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters (tied weights once, since `parameters()` de-duplicates)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _random_ids(vocab_size: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """[batch, length] int64 token ids, reproducible per (seed, batch, length) so teacher and student see the same."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 10_007 + length)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).to(device)


def _forward_kwargs(model: PreTrainedModel) -> dict:
    """Only compute logits at the last position when the model supports it: a real prefill needs only that
    one, and a 150k-vocab LM head over every position would dominate the timing."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _pad_token_id(model: PreTrainedModel) -> int:
    """A pad id for `generate` (only used for finished rows, which never occur with min_new_tokens)."""
    gc = model.generation_config
    for tok in (gc.pad_token_id, gc.eos_token_id):
        if isinstance(tok, list) and tok:
            return int(tok[0])
        if isinstance(tok, int):
            return tok
    return 0


def _measure_prefill(
    model: PreTrainedModel, vocab_size: int, s: LatencySettings, timer: _Timer, out: dict[str, dict]
) -> None:
    fkw = _forward_kwargs(model)
    for batch, length in s.prefill:
        ids = _random_ids(vocab_size, batch, length, s.seed, timer.device)
        mask = torch.ones_like(ids)

        def run() -> object:
            # use_cache=True: a real prefill also writes the KV cache, and that costs memory traffic.
            return model(input_ids=ids, attention_mask=mask, use_cache=True, **fkw).logits

        times, peak = timer.run(run, s.warmup, s.repeats)
        tps = [batch * length / t for t in times]
        out[f"prefill_b{batch}_s{length}"] = _entry(tps, "tokens_per_s", "forward", batch, length, peak)


def _measure_ttft(
    model: PreTrainedModel, vocab_size: int, s: LatencySettings, timer: _Timer, out: dict[str, dict]
) -> None:
    fkw = _forward_kwargs(model)
    for length in s.ttft_lengths:
        ids = _random_ids(vocab_size, 1, length, s.seed, timer.device)
        mask = torch.ones_like(ids)

        def run() -> object:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **fkw).logits
            # The greedy token is what a server would stream back; .item() makes the host wait for it.
            return logits[:, -1].argmax(-1).item()

        times, peak = timer.run(run, s.warmup, s.repeats)
        out[f"ttft_b1_s{length}"] = _entry([t * 1000 for t in times], "ms", "forward", 1, length, peak)


def _generate_fn(
    model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, static: bool
) -> Callable[[], torch.Tensor]:
    kwargs: dict = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=1,
        # min == max: EOS can never end a row early, so every run generates exactly new_tokens tokens.
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=_pad_token_id(model),
    )
    if static:
        # On CUDA, generate compiles the decode step itself when the cache is static (reduce-overhead mode,
        # i.e. CUDA graphs); prefill stays eager.
        kwargs["cache_implementation"] = "static"
    return lambda: model.generate(**kwargs)


def _paired_ms_per_token(timer: _Timer, first: Callable[[], object], full: Callable[[], object], n: int,
                         repeats: int) -> list[float]:
    """`repeats` values of (t(full) - t(first)) / (n - 1) in ms, each from a pair timed back to back: `full`
    makes n tokens and `first` one, so the difference is n - 1 decode steps without the prefill and set-up."""
    per_token = []
    for _ in range(repeats):
        t_first = timer.seconds(first)
        t_full = timer.seconds(full)
        # Clamp at a tiny positive value: on a noisy CPU a pair can invert for very small models.
        per_token.append(max((t_full - t_first) / (n - 1), 1e-9) * 1000)
    return per_token


def _measure_decode(
    model: PreTrainedModel,
    vocab_size: int,
    s: LatencySettings,
    timer: _Timer,
    batch: int,
    static: bool,
) -> dict:
    """ms per output token = (t(generate N) - t(generate 1)) / (N - 1), paired per repeat: this removes
    the prefill and generate's set-up, leaving only decode steps."""
    path = "static_compile" if static else "generate"
    n = s.decode_new_tokens
    if n < 2:
        return _failed("ms_per_token", path, batch, s.decode_prompt_len, "decode_new_tokens must be >= 2")
    ids = _random_ids(vocab_size, batch, s.decode_prompt_len, s.seed, timer.device)
    full = _generate_fn(model, ids, n, static)
    first = _generate_fn(model, ids, 1, static)
    # Warm-up, then timed pairs. With static_compile the warm-up must be the full length: it triggers the
    # compile, and a shorter run would size the static cache differently and recompile later. Eager CPU
    # has nothing to compile, so a 2-token run warms the prefill and decode-step shapes at a fraction of
    # the cost (the batch-4 decode dominates the CPU budget); its RSS peak then misses N-2 tokens of cache.
    warm = full if (static or timer.is_cuda) else _generate_fn(model, ids, 2, static)
    _, peak = timer.run(warm, s.warmup, 0)
    per_token = _paired_ms_per_token(timer, first, full, n, s.repeats)
    extra: dict = {"new_tokens": n}
    if static:
        # generate keeps its compiled forward here; absent means it fell back to eager with a static cache.
        extra["compiled"] = hasattr(model, "_compiled_call")
    return _entry(per_token, "ms_per_token", path, batch, s.decode_prompt_len, peak, **extra)


def _measure_graph_decode(model: PreTrainedModel, vocab_size: int, s: LatencySettings, timer: _Timer,
                          batch: int) -> dict:
    """ms per output token of greedy decode replaying one CUDA graph per step (eval.graph_decode), paired as
    `_measure_decode` is: (t(prefill + N-1 steps) - t(prefill)) / (N - 1)."""
    n = s.decode_new_tokens
    if n < 2:
        return _failed("ms_per_token", "graph", batch, s.decode_prompt_len, "decode_new_tokens must be >= 2")
    ids = _random_ids(vocab_size, batch, s.decode_prompt_len, s.seed, timer.device)
    dec = GraphDecoder(model, batch, s.decode_prompt_len, n)
    dec.prefill(ids)
    if timer.is_cuda:
        dec.capture()

    def first() -> None:
        dec.prefill(ids)

    def full() -> None:
        dec.prefill(ids)
        for _ in range(n - 1):
            dec.step()

    _, peak = timer.run(full, s.warmup, 0)
    per_token = _paired_ms_per_token(timer, first, full, n, s.repeats)
    return _entry(per_token, "ms_per_token", "graph", batch, s.decode_prompt_len, peak, new_tokens=n,
                  captured=dec.graph is not None)


def host_probe_us(device: str | torch.device, ops: int = 200, repeats: int = 5) -> float:
    """Median microseconds of `ops` back-to-back tiny elementwise ops on `device`, then a synchronisation: the
    per-op host and launch cost that bounds batch-1 decode of a small model. Not a benchmark of anything by
    itself; two models timed under the same host conditions get about the same probe."""
    device = torch.device(device)
    x = torch.zeros(1, device=device)
    times = []
    for _ in range(repeats + 1):  # the first run warms the kernel
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(times[1:]))


HOST_DRIFT = 0.2  # a host probe this much slower or faster for one model than the other marks a host difference


def settle_host(device: str | torch.device, reference_us: float, wait_s: float = 60.0,
                pause_s: float = 2.0) -> tuple[float, float]:
    """Probe the host until its probe is within HOST_DRIFT of `reference_us` (the model timed first in this
    comparison) or `wait_s` seconds have passed; returns (the last probe in microseconds, seconds waited).

    A host disturbance seen on one H200 was passing: the student timed right after its evaluations probed 1.58x
    slow and its host-bound settings ran 1.6x slow, while its later, GPU-bound ones matched the other student's
    (docs/results/flagship2). Waiting for the host to match is cheap next to timing it disturbed."""
    t0 = time.perf_counter()
    probe = host_probe_us(device)
    while abs(probe / reference_us - 1) > HOST_DRIFT and time.perf_counter() - t0 < wait_s:
        time.sleep(pause_s)
        probe = host_probe_us(device)
    return probe, time.perf_counter() - t0


def _graph_decode_or_failed(model: PreTrainedModel, vocab_size: int, s: LatencySettings, timer: _Timer,
                            batch: int) -> dict:
    """_measure_graph_decode, or a failed entry with the reason when the step cannot be captured (a host read
    inside the model's forward, a cache the model does not support). A failure that leaves the GPU unusable is
    raised with what to switch off."""
    try:
        return _measure_graph_decode(model, vocab_size, s, timer, batch)
    except Exception as exc:  # noqa: BLE001 - capture and cache failures come in many types
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if timer.is_cuda:
        try:
            torch.cuda.synchronize(timer.device)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"the CUDA-graph decode path failed ({reason}) and left the GPU unusable "
                               f"({type(exc).__name__}); set latency.graph_decode=off and run again") from exc
    return _failed("ms_per_token", "graph", batch, s.decode_prompt_len, reason)


def _other_threads() -> list[str]:
    """Names of the Python threads alive besides this one: a busy one takes the GIL from a host-bound timing."""
    me = threading.current_thread()
    return sorted(t.name for t in threading.enumerate() if t is not me)


# Decode paths by key prefix: `decode_b<N>` is plain generate, the others are timed only when switched on.
DECODE_PATHS = ("decode_b", "decode_static_b", "decode_graph_b")


def add_best_decode(out: dict[str, dict]) -> dict[str, dict]:
    """Add `decode_best_b<N>` for every batch timed on two or more decode paths (DECODE_PATHS): the entry of the
    fastest path with a number (`path` says which; `paths` holds every path's median). Returns `out`. Batches
    timed on one path get none: the entry would only repeat `decode_b<N>`."""
    batches = {k.removeprefix(prefix) for prefix in DECODE_PATHS[1:] for k in out if k.startswith(prefix)}
    for batch in sorted(batches):
        timed_paths = [out[f"{prefix}{batch}"] for prefix in DECODE_PATHS if f"{prefix}{batch}" in out]
        if len(timed_paths) < 2:
            continue
        timed = [e for e in timed_paths if e.get("median") is not None]
        best = min(timed, key=lambda e: e["median"]) if timed else timed_paths[0]
        out[f"decode_best_b{batch}"] = {**best, "paths": {e["path"]: e.get("median") for e in timed_paths}}
    return out


def measure_latency(
    model: PreTrainedModel,
    vocab_size: int,
    settings: LatencySettings,
    device: str | torch.device,
    reference_probe_us: float | None = None,
) -> dict[str, dict]:
    """Time one model (already on `device`) on random token ids in [0, vocab_size).

    reference_probe_us: the host probe of a model this one will be compared with; on a GPU, timing waits (up to a
    minute) for the host to probe within HOST_DRIFT of it (`settle_host`), and records the wait as "host_settle_s".

    Returns {setting: entry}, e.g. "prefill_b4_s128" (tokens_per_s), "ttft_b1_s128" (ms),
    "decode_b1" (ms_per_token, plain generate), "decode_static_b1" (static cache + compile, GPU only),
    "decode_graph_b1" (one CUDA graph per step; eager steps on CPU), "decode_best_b1" (the fastest of those
    timed, when two or more were), "memory_weights" and "memory_peak_extra"
    (bytes). Each entry: {"metric", "median", "p20", "p80", "n", "higher_is_better", "path", "batch", "length",
    "host_probe_us", "other_threads" (see the module's docstring), ...}; a path that could not run has median
    None and an "error" string.
    """
    if settings.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {settings.repeats}")
    device = torch.device(device)
    timer = _Timer(device)
    was_training = model.training
    model.eval()
    out: dict[str, dict] = {}
    phases = 2 + len(settings.decode_batches) * (1 + settings.static_compile + settings.graph_decode)
    bar = tqdm(total=phases, desc="latency", unit="phase", leave=False)
    if reference_probe_us and device.type == "cuda":  # a CPU timing is its own host: the wait would only cost
        probe, waited = settle_host(device, reference_probe_us)
        host = {"host_probe_us": probe, "host_settle_s": round(waited, 2)}
    else:
        host = {"host_probe_us": host_probe_us(device)}
    host["other_threads"] = _other_threads()
    try:
        with torch.inference_mode():
            _measure_prefill(model, vocab_size, settings, timer, out)
            bar.update()
            _measure_ttft(model, vocab_size, settings, timer, out)
            bar.update()
            for batch in settings.decode_batches:
                out[f"decode_b{batch}"] = _measure_decode(model, vocab_size, settings, timer, batch, static=False)
                bar.update()
            if settings.static_compile:
                for batch in settings.decode_batches:
                    bar.update()
                    key = f"decode_static_b{batch}"
                    try:
                        out[key] = _measure_decode(model, vocab_size, settings, timer, batch, static=True)
                    except Exception as exc:  # noqa: BLE001 - compile failures come in many types
                        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        out[key] = _failed("ms_per_token", "static_compile", batch, settings.decode_prompt_len, reason)
            if settings.graph_decode:
                for batch in settings.decode_batches:
                    bar.update()
                    out[f"decode_graph_b{batch}"] = _graph_decode_or_failed(model, vocab_size, settings, timer,
                                                                            batch)
    finally:
        model.train(was_training)
        bar.close()

    # A CPU figure means little without its thread count: on a shared 2-core box, 2 OpenMP threads next to
    # another busy process ran a tiny model 20x slower than 1 thread did.
    context = ({"device": str(device)} | ({} if timer.is_cuda else {"cpu_threads": torch.get_num_threads()})
               | host)
    for entry in out.values():
        entry.update(context)
    add_best_decode(out)
    wb = weight_bytes(model)
    out["memory_weights"] = _entry([float(wb)], "bytes", "weights", 0, 0, None)
    peaks = [e["peak_extra_bytes"] for e in out.values() if "peak_extra_bytes" in e]
    source = "torch.cuda.max_memory_allocated" if timer.is_cuda else "rss_sampled"
    out["memory_peak_extra"] = _entry([float(max(peaks, default=0))], "bytes", "all", 0, 0, None, source=source,
                                      **context)
    out["memory_weights"].update(context)
    return out


def best_of(candidates: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per setting, the best entry among several ways of running one model ({implementation: measure_latency
    result}, e.g. the teacher on stock transformers and on our fused kernels), tagged "implementation" with the
    one that won: what serving the model would cost at its best, the fair denominator of a speedup. A setting
    where no candidate has a number keeps the first candidate's entry (its error says why)."""
    out: dict[str, dict] = {}
    for name, results in candidates.items():
        for key, e in results.items():
            cur = out.get(key)
            if e.get("median") is None:
                if cur is None:
                    out[key] = {**e, "implementation": name}
                continue
            higher = e.get("higher_is_better", HIGHER_IS_BETTER.get(e["metric"], False))
            better = cur is None or cur.get("median") is None or (
                e["median"] > cur["median"] if higher else e["median"] < cur["median"])
            if better:
                out[key] = {**e, "implementation": name}
    return out


def compare_latency(teacher: dict, student: dict) -> dict[str, dict]:
    """Per setting present in both with numbers: {"metric", "teacher", "student", "speedup", "path", "batch",
    "length"}, and "teacher_implementation" where the teacher's entry names one (best_of), "student_path" where
    the student ran another path (decode_best), "host_probe_us" {"teacher", "student"} where both have one.
    speedup > 1 means the student is better: student/teacher for higher-is-better metrics (throughput),
    teacher/student for times and bytes."""
    out: dict[str, dict] = {}
    for key, t in teacher.items():
        s = student.get(key)
        if s is None or t.get("median") is None or s.get("median") is None:
            continue
        tm, sm = float(t["median"]), float(s["median"])
        higher = t.get("higher_is_better", HIGHER_IS_BETTER.get(t["metric"], False))
        num, den = (sm, tm) if higher else (tm, sm)
        out[key] = {
            "metric": t["metric"],
            "teacher": tm,
            "student": sm,
            "speedup": num / den if den > 0 else float("inf"),
            "path": t.get("path"),
            "batch": t.get("batch"),
            "length": t.get("length"),
        }
        if "implementation" in t:
            out[key]["teacher_implementation"] = t["implementation"]
        if s.get("path") != t.get("path"):  # decode_best: each model on its own fastest path
            out[key]["student_path"] = s.get("path")
        probes = {"teacher": t.get("host_probe_us"), "student": s.get("host_probe_us")}
        if all(isinstance(v, (int, float)) for v in probes.values()):
            out[key]["host_probe_us"] = probes
    return out


def host_drift(table: dict[str, dict]) -> dict[str, float]:
    """Settings of a compare_latency table whose teacher and student were timed under host conditions that
    differ by more than HOST_DRIFT: {setting: student probe / teacher probe}. Such a setting's speedup, where the
    host bounds it (batch-1 decode and time to first token of a small model), says more about the host than
    about the models."""
    out = {}
    for key, row in table.items():
        if row.get("metric") == "bytes":
            continue
        p = row.get("host_probe_us") or {}
        t, s = p.get("teacher"), p.get("student")
        if isinstance(t, (int, float)) and isinstance(s, (int, float)) and t > 0 and abs(s / t - 1) > HOST_DRIFT:
            out[key] = s / t
    return out
