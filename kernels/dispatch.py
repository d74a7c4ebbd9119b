"""Never slower than stock: for each problem, the path that measured fastest on this GPU.

Our fused kernels win on most MoE shapes, not all (a DeepSeek-V3-class layer at one token ran 3x slower than
transformers' `grouped_mm` as a graph replay). So `kernels.hf_moe` does not assume: the first time a problem is
seen (the experts module's shape, dtype and activation, top-k, the token count rounded up to a power of two,
the GPU, the torch and Triton versions, a digest of our kernels' source), each candidate path (ours,
`grouped_mm`, `batched_mm` for experts; ours and the model's own for routers) runs on that very input, timed
with CUDA events, and the fastest is kept: in memory, and on disk (`$DISTILL_CACHE/moe_dispatch.json`, default
~/.cache/moe-distill), so that a second process does not time again. A path that fails (out of memory,
resources) is not a candidate. A choice other than ours is logged once, with both times.

Two regimes, two choices. A plain call pays the host's launch work as well as the GPU's; a CUDA-graph replay (a
captured decode step) pays the GPU's alone, and at a few tokens the two rank the candidates differently (on a
DeepSeek-V3 layer at one token our one-kernel router wins plain calls and loses graph replays). So each candidate
is also timed inside a CUDA graph (GRAPH_CALLS calls of it per graph), and a call made while a graph is being
captured runs the graph-fastest path. A candidate that cannot be captured is not a graph candidate.

No timing happens where it cannot: inside CUDA-graph capture or torch.compile tracing (the known choice, or
ours, runs), or off the GPU (ours: under the Triton interpreter, the tests). `DISTILL_MOE_DISPATCH=fused` or
`=stock` turns measuring off and forces one side (benchmarks of our kernels alone, comparisons).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable, ContextManager, Mapping

import torch

log = logging.getLogger(__name__)
ENV = "DISTILL_MOE_DISPATCH"  # "measure" (default), "fused", "stock"
OURS = "fused_triton"
FILE = "moe_dispatch.json"


def cache_path() -> Path:
    """Where choices persist: $DISTILL_CACHE/moe_dispatch.json (the project's cache folder), or ~/.cache."""
    root = os.environ.get("DISTILL_CACHE") or str(Path.home() / ".cache" / "moe-distill")
    return Path(root) / FILE


def token_bucket(tokens: int) -> int:
    """The power of two >= tokens: a choice measured at one count stands for counts up to it."""
    return 1 << max(0, tokens - 1).bit_length()


@lru_cache(maxsize=None)
def kernels_version() -> str:
    """A digest of this package's source files. A choice persisted on disk was measured against the kernels of
    its day: when ours change (faster or slower), every problem is measured again instead of trusting it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment_key(device: torch.device) -> str:
    """The GPU and software a timing holds for, our kernels' source included."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}|kernels {kernels_version()}"


def burst_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call over one burst of `reps` calls of `fn` made back to back between two CUDA events, as a
    model's layers call it (the host launching the next while the GPU runs this one). A per-call sync would
    charge every call the host's whole launch time, which a forward overlaps."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _cuda_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of `fn`: the median of 3 bursts (`burst_time`) of `reps` calls, after two warm-ups."""
    for _ in range(2):
        fn()
    return statistics.median(burst_time(fn, reps) for _ in range(3))


GRAPH_CALLS = 8  # calls of a candidate per timed graph


def _cuda_graph_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of `fn` inside a CUDA graph of GRAPH_CALLS calls: the GPU's time alone, what a captured
    decode step pays. A graph of one call would charge each call a graph launch, which a decode step's graph pays
    once for all its layers (one H200: 18.9 us a replay for a 1-us kernel), and hide the difference between two
    candidates of a small layer under it. Raises (RuntimeError) when `fn` cannot be captured, e.g. it waits for
    the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):  # capture wants its lazy set-up (compiles, allocations) done before
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    try:
        return _cuda_time(graph.replay, reps) / GRAPH_CALLS
    finally:
        del graph


def capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's device now (the call is recorded, to be replayed)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


GRAPH = "|graph"  # suffix of the key a graph-replay choice is kept under
# Graphs are captured for decode steps, a batch of sequences' next tokens: token buckets above this are not timed as
# graph replays (a capture of a prefill-sized call would hold its activations in the graph's memory pool).
GRAPH_MAX_TOKENS = 512


class Dispatcher:
    """Choices by problem key, measured once and persisted. `timer(name, fn) -> seconds` times one candidate's
    plain calls (CUDA events by default), `graph_timer` the replays of a graph of it (by default on CUDA events
    when `timer` is the default too; None: graph captures run the plain choice); `path` is the JSON file (None:
    memory only)."""

    def __init__(self, path: Path | None = None, timer: Callable[[str, Callable[[], object]], float] | None = None,
                 reps: int = 7, graph_timer: Callable[[str, Callable[[], object]], float] | None = None) -> None:
        self.path = path
        self.timer = timer or (lambda _name, fn: _cuda_time(fn, reps))
        if graph_timer is None and timer is None:
            graph_timer = lambda _name, fn: _cuda_graph_time(fn, reps)  # noqa: E731
        self.graph_timer = graph_timer
        self.choices: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self._loaded = False
        self._lock = threading.RLock()  # re-entered: a block's candidates call its router's and experts' choose

    def _load(self) -> None:
        if self._loaded or self.path is None:
            self._loaded = True
            return
        self._loaded = True
        try:
            saved = json.loads(self.path.read_text())
            for k, v in saved.items():
                if isinstance(v, dict) and "choice" in v:
                    self.choices[k] = v["choice"]
                    if "graph_choice" in v:  # absent in files written before graph replays were timed
                        self.choices[k + GRAPH] = v["graph_choice"]
        except (OSError, ValueError):
            pass  # no file yet, or a damaged one: measure again and rewrite it

    def _save(self, key: str) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                saved = json.loads(self.path.read_text())  # another process may have added choices meanwhile
            except (OSError, ValueError):
                saved = {}
            saved[key] = {"choice": self.choices[key], "seconds": self.timings.get(key, {})}
            if key + GRAPH in self.choices:
                saved[key].update(graph_choice=self.choices[key + GRAPH],
                                  graph_seconds=self.timings.get(key + GRAPH, {}))
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".moe_dispatch.")
            with os.fdopen(fd, "w") as f:
                json.dump(saved, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home: the choice holds for this process
            log.warning("moe dispatch: could not save %s (%s)", self.path, e)

    def known(self, key: str) -> str | None:
        self._load()
        return self.choices.get(key)

    def choose(self, key: str, candidates: Mapping[str, Callable[[], object]], measurable: bool,
               graph: bool = False, time_graphs: bool = True) -> str:
        """The name of the candidate to run for `key`: the known choice, else (when `measurable`) the fastest of
        `candidates` timed now, as plain calls and (with a graph timer and `time_graphs`: problems small enough
        to be captured, decode sizes) as graph replays, else ours. `graph`: the call is being captured into a
        CUDA graph, so the graph-replay choice runs (the plain one where graphs were not timed); nothing is
        timed during a capture. Candidates are called with no arguments and must not change state."""
        graph_timer = self.graph_timer if time_graphs else None
        forced = os.environ.get(ENV, "measure")
        if forced == "fused":
            return OURS
        if forced == "stock":
            return next(n for n in candidates if n != OURS)
        if graph:
            got = self.known(key + GRAPH) or self.known(key)
            return got if got is not None and got in candidates else OURS
        got = self.known(key)
        if got is not None and got in candidates:
            if measurable and graph_timer is not None and key + GRAPH not in self.choices:
                with self._lock:  # a choice from a file written before graph replays were timed
                    self._measure(key + GRAPH, candidates, graph_timer)
                    self._save(key)
            return got
        if not measurable:
            return OURS
        with self._lock:
            best = self._measure(key, candidates, self.timer)
            if best is None:
                return OURS
            if graph_timer is not None:
                self._measure(key + GRAPH, candidates, graph_timer)
            self._save(key)
        return best

    def _measure(self, key: str, candidates: Mapping[str, Callable[[], object]],
                 timer: Callable[[str, Callable[[], object]], float]) -> str | None:
        """Time every candidate with `timer`, keep and return the fastest (None when every one failed; a graph
        key then keeps the plain choice, as a capture would run it). A choice other than ours is logged."""
        times: dict[str, float] = {}
        for name, fn in candidates.items():
            try:
                times[name] = timer(name, fn)
            except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:  # not a candidate here
                log.info("moe dispatch: %s failed on %s (%s)", name, key, str(e)[:200])
        if not times:
            if key.endswith(GRAPH) and key[:-len(GRAPH)] in self.choices:
                self.choices[key] = self.choices[key[:-len(GRAPH)]]
            return None
        best = min(times, key=times.__getitem__)
        self.choices[key], self.timings[key] = best, times
        if best != OURS and OURS in times:
            log.warning("moe dispatch: %s runs %s (%.1f us) instead of our kernels (%.1f us)", key, best,
                        times[best] * 1e6, times[OURS] * 1e6)
        return best


_default: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher, persisting to cache_path()."""
    global _default
    if _default is None:
        _default = Dispatcher(cache_path())
    return _default


def can_measure(x: torch.Tensor) -> bool:
    """Whether timing may happen now on x's device: a GPU, not capturing a CUDA graph, not tracing."""
    return (x.is_cuda and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def module_path(module: torch.nn.Module, x: torch.Tensor, slot: tuple, tokens: int, problem: Callable[[], str],
                candidates: Callable[[], Mapping[str, Callable[[], object]]],
                trials: Callable[[], ContextManager] | None = None) -> str:
    """The path for this call of `module` on x: the choice kept on the module for `slot` (dtype, top-k, ... and the
    token bucket; whether a graph is being captured is added here), a dict lookup after the first call; else the
    process dispatcher's for the problem `problem()` names (the environment is prefixed), measured now where it
    can be, and kept. `tokens`: the token bucket, which decides whether graph replays are timed. `candidates()`
    is built only then, and the measurement runs inside `trials()` when given (a block sets its hooks aside)."""
    graph = capturing(x)  # a graph capture runs the graph-fastest path, which may differ from the plain one
    slot = (*slot, graph)
    chosen = module.__dict__.setdefault("_fused_paths", {})
    path = chosen.get(slot)
    if path is not None:
        return path
    measurable = can_measure(x)
    key = f"{environment_key(x.device)}|{problem()}"
    if trials is None:
        path = default_dispatcher().choose(key, candidates(), measurable, graph=graph,
                                           time_graphs=tokens <= GRAPH_MAX_TOKENS)
    else:
        with trials():
            path = default_dispatcher().choose(key, candidates(), measurable, graph=graph,
                                               time_graphs=tokens <= GRAPH_MAX_TOKENS)
    if measurable or path != OURS:  # an unmeasured default is asked again where timing is possible
        chosen[slot] = path
    return path
