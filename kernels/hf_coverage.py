"""Which transformers experts modules our kernels cover, and why not: the verdict `kernels.hf_moe` and
`kernels.hf_shared` ask before running our kernels on a module, and the one-line notice of a fallback."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers.integrations import moe as hf_moe

from kernels.interpreter import INTERPRETED
from kernels.moe_experts import ExpertWeights
from kernels.moe_grouped_gemm import ACTIVATIONS, CLAMPED_SWIGLU

# The integration's one logger: users (and tests) listen to kernels.hf_moe for every fallback notice.
log = logging.getLogger("kernels.hf_moe")
_warned: set[str] = set()


def fallback(reason: str, instead: str = "this experts module runs transformers' grouped_mm instead") -> None:
    """Log, once per reason, that our kernels do not run somewhere and what runs instead."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning("fused_triton: %s; %s", reason, instead)

# The gate `fused_experts` computes: (activation name, swiglu_alpha, swiglu_limit); the last two matter only to
# the clamped SwiGLU.
Gate = tuple[str, float, float]
PLAIN = (1.702, 7.0)  # fused_experts' defaults, ignored by hidden_act activations

# Experts classes with their own `_apply_gate` that our kernels compute, by class name (so that no architecture
# module is imported just to be recognised) -> the gate, read off the module. Any other custom gate falls back.
KNOWN_GATES: dict[str, Callable[[torch.nn.Module], Gate]] = {
    # GPT-OSS: gate = min(gate, limit), up = clamp(up, -limit, limit), (up + 1) * gate * sigmoid(alpha * gate),
    # on interleaved gate/up columns (the layout `is_concatenated=False` already describes).
    "GptOssExperts": lambda m: (CLAMPED_SWIGLU, float(m.alpha), float(m.limit)),
}


def gate_of(experts: torch.nn.Module) -> Gate | str:
    """The gate our kernels compute for this experts module, or why they cannot."""
    cls = type(experts)
    apply_gate = getattr(cls, "_apply_gate", hf_moe._default_apply_gate)
    if apply_gate is not hf_moe._default_apply_gate:
        known = KNOWN_GATES.get(cls.__name__)
        # The registry is keyed by name: the gate must still be the one that class defines, not a subclass's or a
        # patched one that happens to sit on a class of that name.
        if known is None or getattr(apply_gate, "__qualname__", None) != f"{cls.__name__}._apply_gate":
            return f"{cls.__name__} has its own gate function"
        try:
            return known(experts)
        except (AttributeError, TypeError, ValueError) as e:  # e.g. a config without swiglu_limit
            return f"{cls.__name__}'s gate parameters are unreadable ({e})"
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if act not in ACTIVATIONS:
        return f"activation {act!r} is not supported"
    return (act, *PLAIN)


def bias_problem(experts: torch.nn.Module) -> str | None:
    """Why this module's expert biases cannot go to our kernels (None when it has none, or usable ones)."""
    if not getattr(experts, "has_bias", False):
        return None
    gb, db = getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)
    E, H = experts.down_proj.shape[0], experts.down_proj.shape[2 if getattr(experts, "is_transposed", False) else 1]
    two_i = experts.gate_up_proj.shape[2 if getattr(experts, "is_transposed", False) else 1]
    if gb is None or db is None or tuple(gb.shape) != (E, two_i) or tuple(db.shape) != (E, H):
        return (f"expert biases of shapes {None if gb is None else tuple(gb.shape)} / "
                f"{None if db is None else tuple(db.shape)} are not [E, 2I] = {(E, two_i)} / [E, H] = {(E, H)}")
    return None


def unsupported(experts: torch.nn.Module, hidden: torch.Tensor) -> str | None:
    """Why our kernels cannot run this experts module on this input (None when they can)."""
    if not (hidden.is_cuda or (INTERPRETED and hidden.device.type == "cpu")):
        return f"input on {hidden.device.type} (Triton needs a CUDA GPU, or TRITON_INTERPRET=1 on CPU)"
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {hidden.dtype} is not supported"
    if not getattr(experts, "has_gate", True):
        return "experts without a gate projection are not supported"
    if getattr(experts, "has_post_expert_norm", False):
        return "a post-expert norm is not supported"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism is not supported"
    bias = bias_problem(experts)
    if bias is not None:
        return bias
    gate = gate_of(experts)
    return gate if isinstance(gate, str) else None


# What a verdict holds: (why not, or None; transposed layout; concatenated gate/up; the gate; has biases).
Verdict = tuple[str | None, bool, bool, Gate, bool]


def verdict(experts: torch.nn.Module, hidden: torch.Tensor) -> Verdict:
    """Whether our kernels run this experts module on inputs like `hidden`, and the layout they read it in.

    It depends on the module, the input's dtype and its device type only, so it is worked out once per
    combination (at decode sizes these attribute lookups cost as much as a kernel launch)."""
    key = (hidden.dtype, hidden.device.type)
    verdicts = experts.__dict__.setdefault("_fused_verdicts", {})
    got = verdicts.get(key)
    if got is None:
        reason = unsupported(experts, hidden)
        gate = gate_of(experts) if reason is None else ("", *PLAIN)
        got = verdicts[key] = (reason, bool(getattr(experts, "is_transposed", False)),
                               bool(getattr(experts, "is_concatenated", True)), gate,
                               bool(getattr(experts, "has_bias", False)))
    return got


def expert_weights(experts: torch.nn.Module, v: Verdict) -> ExpertWeights:
    """The module's expert weights as our kernels address them. Read at every call (not cached with the
    verdict), so reloaded weights are seen."""
    _, transposed, concatenated, _, has_bias = v
    return ExpertWeights(experts.gate_up_proj, experts.down_proj, transposed=transposed, concatenated=concatenated,
                         gate_up_bias=experts.gate_up_proj_bias if has_bias else None,
                         down_bias=experts.down_proj_bias if has_bias else None)
