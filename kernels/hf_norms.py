"""RMSNorm modules of a loaded transformers model on our one-pass kernel (kernels/rms_norm.py).

A module is a candidate by structure, not by class name: a leaf module with a 1-D `weight` parameter, no bias,
and a float epsilon (`variance_epsilon`, `eps` or `epsilon`). Structure is not semantics, so at its first call
per (input dtype, weight dtype, device type) the module runs its own forward and each of the kernel's modes
(`rms_norm.MODES`) on the same input; the closest mode is kept if it is within rounding of the stock output,
and a module no mode reproduces (a LayerNorm without bias, a norm that centres or clips) keeps its own forward,
logged once. Our forward then runs only where it is sound and pays: inference (no autograd through it), outside
torch.compile's tracing (which fuses these ops itself), on a GPU, or under Triton's interpreter (the tests).
"""
from __future__ import annotations

from typing import Any

import torch

from kernels import hf_coverage as coverage
from kernels import rms_norm as kernel
from kernels.dispatch import capturing
from kernels.forward_swap import install_forward, restore_forwards
from kernels.interpreter import INTERPRETED

INSTEAD = "it keeps its own forward"
FLAG = "_fused_norm"  # set on modules that run _fused_norm_forward
EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
# Relative difference (Frobenius norms) from the module's own output within which a mode counts as the same
# computation. Both sides take the same float32 steps; they differ only in the order of the sum of squares, so a
# few outputs land one half-precision ulp (2^-8 relative for bf16) apart: far below this. A wrong mode (a missing
# weight, 1 + w for w, a centred norm) is off by order one.
VERIFY_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


def norm_epsilon(module: torch.nn.Module) -> float | None:
    """The module's epsilon if it looks like an RMSNorm (a leaf with a 1-D weight, no bias, a float epsilon)."""
    w = getattr(module, "weight", None)
    if next(module.children(), None) is not None or not isinstance(w, torch.nn.Parameter) or w.dim() != 1:
        return None
    if getattr(module, "bias", None) is not None:
        return None
    for name in EPS_NAMES:
        eps = getattr(module, name, None)
        if isinstance(eps, float) and not isinstance(eps, bool):
            return eps
    return None


@torch.no_grad()
def _choose_mode(module: torch.nn.Module, x: torch.Tensor, eps: float) -> tuple[int | None, str]:
    """(the kernel mode that reproduces module's forward on x, "") or (None, why none does)."""
    name = type(module).__name__
    stock = module._stock_forward(x)
    if not isinstance(stock, torch.Tensor) or stock.shape != x.shape:
        return None, f"{name}'s forward does not return one tensor of its input's shape"
    ref = stock.double()
    scale = ref.norm().clamp_min(1e-30)
    best, best_err = None, float("inf")
    for mode in kernel.MODES:
        if kernel.out_dtype(mode, x.dtype, module.weight.dtype) != stock.dtype:
            continue
        err = ((kernel.rms_norm(x, module.weight, eps, mode).double() - ref).norm() / scale).item()
        if err < best_err:
            best, best_err = mode, err
    tol = VERIFY_TOL.get(x.dtype, 4e-3)
    if best is None or not best_err <= tol:
        return None, (f"{name} is not an RMSNorm our kernel computes (closest mode off by {best_err:.1e}, > "
                      f"{tol:.0e})")
    return best, ""


def _fused_norm_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    # Ours takes one positional tensor; any other call (keywords, a gate, more inputs) is the module's business.
    x = args[0] if len(args) == 1 and not kwargs else None
    if (not isinstance(x, torch.Tensor) or not (x.is_cuda or INTERPRETED) or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            or not kernel.supports(x, self.weight)):
        return self._stock_forward(*args, **kwargs)
    state = self.__dict__.setdefault("_fused_norm_state", {})
    key = (x.dtype, self.weight.dtype, x.device.type)
    choice = state.get(key)
    if choice is None:
        if capturing(x):
            return self._stock_forward(x)  # not checked yet, and nothing can be compared inside a capture
        mode, reason = _choose_mode(self, x, self._fused_eps)
        choice = state[key] = mode if mode is not None else reason
    if isinstance(choice, str):
        coverage.fallback(choice, INSTEAD)
        return self._stock_forward(x)
    return kernel.rms_norm(x, self.weight, self._fused_eps, choice)


def install_fused_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm-shaped module of `model` the checked one-pass forward; returns how many. A module's own
    forward stays at `_stock_forward` (what runs wherever ours does not)."""
    fused = 0
    for module in model.modules():
        eps = norm_epsilon(module)
        if eps is None:
            continue
        module._fused_eps = eps
        module.__dict__.pop("_fused_norm_state", None)
        fused += install_forward(module, FLAG, _fused_norm_forward)
    return fused


def uninstall_fused_norms(model: torch.nn.Module) -> None:
    """Give every fused norm its own forward back (benchmarks timing the stock model)."""
    restore_forwards(model, FLAG)
