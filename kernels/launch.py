"""A shorter host path for launching our Triton kernels: `fast(kernel)[grid](*args, **constexprs)`.

At a handful of tokens an MoE block is a few small launches, and the host, not the GPU, sets the pace
(kernels/NOTES.md: about 60-70 us of CPU per launch against 16-20 us of GPU time for the router). Triton's
`JITFunction.run` redoes per launch what does not change between decode steps: option parsing, the
specialisation of every argument, a string cache key, the check of used globals, the launch metadata.

`FastKernel` keeps the compiled kernel of each specialisation in a dict keyed by a tuple it computes itself,
and launches it through the compiled kernel's own launcher. The key holds everything Triton specialises on, and
more (each tensor's dtype and 16-byte alignment; each integer's exact value, which covers Triton's equality to 1,
divisibility by 16 and width; every constexpr value; num_warps, num_stages; the device), so a hit always runs the
binary that Triton's own path would pick. A miss goes through Triton's path, which compiles if needed and
returns the compiled kernel.

The short path is taken only where it is sound: on a GPU (never under the interpreter), outside torch.compile's
tracing (which knows Triton's own launch), with no launch hooks installed (profilers), and while
`DISTILL_FAST_LAUNCH` is not "0". If the compiled kernel's launcher does not take the call (another Triton
version), the short path turns itself off for the process, logs why, and the launch goes through Triton's path.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch
from triton import knobs
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.interpreter import INTERPRETED

log = logging.getLogger(__name__)
ENV = "DISTILL_FAST_LAUNCH"
_state = {"broken": ""}  # why the short path was turned off for this process ("" while it works)
MAX_ENTRIES = 4096  # per kernel; past it the dict starts again (a miss costs one launch through Triton's path)
_OPTIONS = {"num_warps", "num_stages"}  # launch options the key covers; any other option takes Triton's path


def enabled() -> bool:
    """Whether launches may take the short path in this process (env switch, interpreter, earlier failure)."""
    return not INTERPRETED and os.environ.get(ENV, "1") != "0" and not _state["broken"]


def _hook_set(hook: Any) -> bool:
    # None (older Triton) or an empty HookChain (Triton 3.6+ always holds one) means nobody listens.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_installed() -> bool:
    runtime = knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _raw_stream(device: int) -> int:
    # The handle of torch's current stream, as Triton's own driver takes it (a capture stream during capture).
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


def _desc_key(d: TensorDescriptor) -> tuple:
    # Triton specialises a host tensor descriptor on its dtype and block shape; shape, strides, padding and the
    # base's alignment are kept too (a superset), so every T gets its own entry.
    return (TensorDescriptor, d.base.dtype, tuple(d.block_shape), tuple(d.shape), tuple(d.strides), d.padding,
            d.base.data_ptr() % 16 == 0)


def arg_key(value: Any, constexpr: bool = False) -> Any:
    """An argument as the key holds it: a bool as (bool, value), apart from the int it equals; a constexpr as its
    value (compiled in); a runtime tensor as (dtype, 16-byte aligned); a host tensor descriptor by _desc_key; a
    runtime float as its type (Triton passes every float as fp32); anything else (ints, None) as itself. Exact
    integers are a superset of what Triton specialises integers on (equal to 1, divisible by 16, width), and hash
    faster than that."""
    if type(value) is bool:
        return bool, value
    if constexpr:
        return value
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if type(value) is TensorDescriptor:
        return _desc_key(value)
    if type(value) is float:
        return float
    return value


class FastKernel:
    """Wraps a `triton.jit` function; `FastKernel(k)[grid](*args, num_warps=, num_stages=, **constexprs)` launches
    like `k[grid](...)`. Runtime arguments positional, in the kernel's order; constexprs by name."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        params = getattr(fn, "params", None) or []  # an interpreted kernel has none: it never takes the short path
        self.names: list[str] = [p.name for p in params]
        self.is_constexpr: list[bool] = [bool(p.is_constexpr) for p in params]
        self.compiled: dict[tuple, Any] = {}
        self.hits = 0  # launches that took the short path (tests, benchmarks)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key(self, args: tuple, kwargs: dict[str, Any], device: int) -> tuple[tuple, list]:
        full = list(args)
        for name in self.names[len(args):]:
            full.append(kwargs[name])  # KeyError: a missing argument, reported by Triton's own path
        # arg_key inline: this runs on every launch, and a call per argument costs more than the rest of the
        # short path.
        tensor = torch.Tensor
        # Ordered by how often each kind occurs in our launches: ints first (most arguments), then tensors.
        spec = tuple(v if type(v) is int else (v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, tensor)
                     else (bool, v) if type(v) is bool else v if c else float if type(v) is float
                     else _desc_key(v) if type(v) is TensorDescriptor else v
                     for v, c in zip(full, self.is_constexpr))
        return (device, kwargs.get("num_warps"), kwargs.get("num_stages"), spec), full

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        """Launch on the current CUDA stream (so CUDA-graph capture sees it), through the short path when sound."""
        if (not enabled() or not self.names or not _OPTIONS.issuperset(set(kwargs).difference(self.names))
                or torch.compiler.is_compiling() or _hooks_installed()):
            self.fn[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        try:
            key, full = self._key(args, kwargs, device)
        except KeyError:
            self.fn[grid](*args, **kwargs)
            return
        kernel = self.compiled.get(key)
        if kernel is None:
            if len(self.compiled) >= MAX_ENTRIES:  # exact integers: many token counts make many keys
                self.compiled.clear()
            self.compiled[key] = self.fn[grid](*args, **kwargs)  # compiles on a first miss; returns the kernel
            return
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        try:
            kernel.run(g0, g1, g2, _raw_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
                       *full)
        except TypeError as err:  # the launcher of this Triton version takes other arguments
            _state["broken"] = f"{type(err).__name__}: {err}"
            log.warning("fast launch off for this process (%s); launching through Triton's own path", _state["broken"])
            self.fn[grid](*args, **kwargs)
            return
        self.hits += 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. triton.cdiv is a constexpr_function: called from the host it runs an import
    and unwraps every argument, a few us per call, and a block makes a dozen such calls."""
    return -(-a // b)


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for grids sized by the GPU; 4 off the GPU (the interpreter),
    a few programs so that persistent loops really loop and split work really splits."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1), for block sizes; plain Python, like cdiv."""
    return 1 << max(0, n - 1).bit_length()


def fast(fn: Any) -> FastKernel:
    """The FastKernel of a `triton.jit` function (one per function, so every caller shares its compiled dict)."""
    wrapped = getattr(fn, "_distill_fast", None)
    if wrapped is None:
        wrapped = FastKernel(fn)
        fn._distill_fast = wrapped
    return wrapped


C = TypeVar("C")
R = TypeVar("R")
_fitted: dict[Hashable, int] = {}  # launch key -> index of the first candidate that the GPU could launch


def launch_fitting(key: Hashable, candidates: Sequence[C], launch: Callable[[C], R]) -> R:
    """`launch(c)` with the first of `candidates` (tile configs, best first) whose kernels the GPU can run.

    Triton compiles a kernel before its first launch and checks its shared memory and registers against the
    device's limits there, raising OutOfResources before anything runs; such a candidate is skipped (logged once
    per key) and the next one tried. The index that launched is remembered under `key` (the problem's shape,
    dtypes and the heuristic's choice), so later calls go straight to it. `launch` must be free of side effects
    until it returns (ours allocate their outputs), since a candidate may fail after launching an earlier kernel.
    Raises the last OutOfResources when no candidate fits.
    """
    start = _fitted.get(key, 0)
    error: OutOfResources | None = None
    for i in range(start, len(candidates)):
        try:
            out = launch(candidates[i])
        except OutOfResources as e:
            error = e
            continue
        if _fitted.get(key) != i:
            if i > 0:
                log.warning("tile config %s does not fit this GPU (%s); using %s", candidates[0], error, candidates[i])
            _fitted[key] = i
        return out
    assert error is not None, "launch_fitting needs at least one candidate"
    raise error
