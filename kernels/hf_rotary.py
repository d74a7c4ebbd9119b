"""transformers' `apply_rotary_pos_emb` on our one-pass kernel (kernels/rotary.py).

Attention modules call their modeling file's module-level `apply_rotary_pos_emb(q, k, cos, sin)` by name, so
the function is replaced in the modeling modules of the model's own classes (only those): for a layout the kernel
takes (q, k [B, H, S, D], cos/sin [B or 1, S, R], the default `unsqueeze_dim=1`) it runs the kernel, for anything
else the file's own function. The name does not promise the rotate-half convention (some files interleave, some
rotate part of the head, GPT-OSS shares one cos of half width between the halves), so the first call per (file,
dtypes, D, R) runs the file's function and the kernel's two readings of cos on random inputs of the call's
shapes (random cos and sin: at position 0, where sin = 0, every convention agrees); the reading that matches is
kept, and a file whose function neither matches keeps its own, logged once. Like the norms: inference only,
outside torch.compile's tracing, on a GPU or under Triton's interpreter.

The function is replaced per modeling file, but ours runs only inside the forward of an attention module of a
model that asked for it: `install_fused_rotary(model)` also wraps those modules' forwards (the modules whose
class's forward names `apply_rotary_pos_emb`) to mark the call as theirs. Another model of the same file in the
process (a derived student of the teacher's own family, a stock copy timed beside the fused one) runs the file's
own function, untouched.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from kernels import hf_coverage as coverage
from kernels import rotary as kernel
from kernels.dispatch import capturing
from kernels.forward_swap import install_forward, restore_forwards
from kernels.interpreter import INTERPRETED

NAME = "apply_rotary_pos_emb"
INSTEAD = "it keeps its own rotary function"
# Ours rounds once from float32; transformers rounds each of its products and the sum to the input dtype.
VERIFY_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_originals: dict[str, Callable[..., Any]] = {}  # modeling module name -> its own function
FLAG = "_fused_rotary_scope"  # set on attention modules whose calls of the function may run ours
_inside = [0]  # how many such attention forwards are running now (nested calls count each)


def _scoped_attention_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    if torch.compiler.is_compiling():  # traced: the file's own function runs anyway, and no counter is traced
        return self._stock_forward(*args, **kwargs)
    _inside[0] += 1
    try:
        return self._stock_forward(*args, **kwargs)
    finally:
        _inside[0] -= 1


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    ref = b.double()
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def _check(original: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, file: str
           ) -> bool | str:
    """The kernel's `shared_halves` that computes `original` on random inputs shaped like (q, k, cos), else why
    none does."""
    gen = torch.Generator(device=q.device).manual_seed(0)

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32).to(t.dtype)

    rq, rk, rc, rs = like(q), like(k), like(cos), like(cos)
    try:
        stock = original(rq, rk, rc, rs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        return f"{file}.{NAME} fails on random inputs of its call's shapes ({str(e)[:100]})"
    if not (isinstance(stock, tuple) and len(stock) == 2 and all(isinstance(t, torch.Tensor) for t in stock)
            and stock[0].shape == q.shape and stock[1].shape == k.shape):
        return f"{file}.{NAME} does not return (q, k) of its inputs' shapes"
    tol = VERIFY_TOL.get(q.dtype, 1e-2)
    errs = {}
    for shared in (False, True):
        if kernel.supports(q, cos, cos, shared) and kernel.supports(k, cos, cos, shared):
            ours = kernel.rotary_pair(rq, rk, rc, rs, shared)
            errs[shared] = max(_relative(ours[0], stock[0]), _relative(ours[1], stock[1]))
    best = min(errs, key=errs.get) if errs else None
    if best is None or not errs[best] <= tol:
        off = f"off by {errs[best]:.1e}, > {tol:.0e}" if best is not None else "no width fits"
        return f"{file}.{NAME} is not the rotate-half embedding our kernel computes ({off})"
    return best


def _fused(file: str, original: Callable[..., Any]) -> Callable[..., Any]:
    verdicts: dict[tuple, bool | str] = {}  # per call signature: the kernel's shared_halves, or why not ours

    def apply_rotary_pos_emb(*args: Any, **kwargs: Any) -> Any:
        # Only the plain call (q, k, cos, sin[, unsqueeze_dim=1]) is ours: files with another signature (Gemma 4
        # rotates one tensor at a time) or another layout (unsqueeze_dim=2) run their own.
        plain = len(args) == 4 and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"}
        if not _inside[0] or not plain or not all(isinstance(t, torch.Tensor) for t in args):
            return original(*args, **kwargs)
        q, k, cos, sin = args
        if (not (q.is_cuda or INTERPRETED) or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and any(t.requires_grad for t in args))
                or not (q.dim() == k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape)):
            return original(*args, **kwargs)
        key = (q.dtype, k.dtype, cos.dtype, q.device.type, q.shape[-1], k.shape[-1], cos.shape[-1])
        verdict = verdicts.get(key)
        if verdict is None:
            if capturing(q):
                return original(q, k, cos, sin)  # not checked yet, and nothing can be compared inside a capture
            verdict = verdicts[key] = _check(original, q, k, cos, file)
        if isinstance(verdict, str):
            coverage.fallback(verdict, INSTEAD)
            return original(q, k, cos, sin)
        if not (kernel.supports(q, cos, sin, verdict) and kernel.supports(k, cos, sin, verdict)):
            return original(q, k, cos, sin)  # strides or a batch the kernel does not take
        return kernel.rotary_pair(q, k, cos, sin, verdict)

    apply_rotary_pos_emb._fused_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _calls_rotary(module: torch.nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and NAME in code.co_names


def install_fused_rotary(model: torch.nn.Module) -> list[str]:
    """Replace `apply_rotary_pos_emb` in the modeling module of each of the model's classes that has one, and mark
    the model's attention modules that call it; returns those modeling modules' names (already replaced ones
    included)."""
    names = sorted({type(m).__module__ for m in model.modules()})
    done = []
    for name in names:
        mod = sys.modules.get(name)
        fn = getattr(mod, NAME, None)
        if not callable(fn):
            continue
        if name not in _originals:
            _originals[name] = fn
            setattr(mod, NAME, _fused(name, fn))
        done.append(name)
    for module in model.modules():
        if type(module).__module__ in done and _calls_rotary(module):
            install_forward(module, FLAG, _scoped_attention_forward)
    return done


def uninstall_fused_rotary(model: torch.nn.Module | None = None) -> None:
    """The model's attention modules get their own forwards back (its rotary runs the file's function again);
    without a model, every replaced modeling module gets its own function back as well."""
    if model is not None:
        restore_forwards(model, FLAG)
        return
    for name, fn in list(_originals.items()):
        mod = sys.modules.get(name)
        if mod is not None:
            setattr(mod, NAME, fn)
        del _originals[name]
