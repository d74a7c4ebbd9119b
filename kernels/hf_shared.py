"""MoE blocks with a shared expert (DeepSeek-V2/V3, Kimi K2, GLM-4-MoE, Qwen2-MoE, Qwen3-Next, ERNIE 4.5, ...):
at decode sizes the shared expert runs inside our experts kernels instead of as a stock MLP beside them.

transformers' block computes `experts(x, top-k of gate(x)) + [sigmoid(shared_expert_gate(x)) *] shared(x)`, the
shared MLP as three nn.Linear calls and an activation: at one token about 40 us of a CUDA-graph decode step on
an H200 (DeepSeek-V3 and Qwen2-MoE shapes, bench/results/moe_decode_h200.csv), half of the whole block on
Qwen2-MoE. Our decode kernels (kernels/moe_gemv.py) take it as a few more slots per token, reading its weights
where they are (no copy): no launch of its own.

A block is recognised by structure, not by class name: children `gate` (a router returning (logits, weights,
indices)), `experts` (transformers' experts interface, a case our kernels cover) and `shared_expert` or
`shared_experts` (an MLP of bias-free nn.Linear `gate_proj`, `up_proj`, `down_proj` and the experts' activation),
with an optional bias-free `shared_expert_gate` nn.Linear(H, 1). Structure is not semantics, so the first call of
each block (per dtype and device type) runs both its stock forward and ours on the same input, and a block whose
outputs differ keeps its stock forward, logged once. After that the block's path is measured like the experts'
(kernels/dispatch.py): the stock forward (with our routers and experts where they win) or ours, whichever is
faster on this GPU, as plain calls and as graph replays.

Only at the decode paths' token counts (moe_experts.DECODE_MAX_TOKENS): above them the shared expert is a dense
matmul over every token, which cuBLAS runs as well as anything, and the stock forward runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.activations import ACT2FN

from kernels import hf_coverage as coverage
from kernels.dispatch import OURS, capturing, module_path, token_bucket
from kernels.forward_swap import install_forward, restore_forwards
from kernels.module_hooks import hooks_set_aside
from kernels.moe_experts import DECODE_MAX_TOKENS, SharedExpert, fused_experts

log = logging.getLogger("kernels.hf_moe")
SHARED_NAMES = ("shared_expert", "shared_experts")
STOCK = "stock"
INSTEAD = "this block runs its stock forward"
FLAG = "_fused_block"  # set on blocks that run _fused_block_forward
# Relative difference (Frobenius norms) between our block's output and the stock forward's above which the
# block is taken not to be what its structure says. Half precision rounds each output to 2^-8 relative and the
# two sides round differently (ours sums in float32), a few 1e-3 in all; a block that gates, scales or routes
# its shared expert otherwise is off by far more.
VERIFY_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _bias_free_linear(m: Any) -> bool:
    # Exactly nn.Linear (a LoRA or quantised wrapper computes something else) with no bias and no hooks.
    return (type(m) is torch.nn.Linear and m.bias is None and not m._forward_hooks
            and not m._forward_pre_hooks)


def shared_module(block: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(attribute name, module) of the block's shared expert, or None."""
    for name in SHARED_NAMES:
        m = getattr(block, name, None)
        if isinstance(m, torch.nn.Module):
            return name, m
    return None


def structure_problem(block: torch.nn.Module) -> str | None:
    """Why this block's shared expert cannot join our experts kernels, from its structure (None when it can)."""
    cls = type(block).__name__
    got = shared_module(block)
    if got is None:
        return f"{cls} has no shared expert"
    name, mlp = got
    if not all(_bias_free_linear(getattr(mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj")):
        return f"{cls}.{name} is not three bias-free nn.Linear gate_proj/up_proj/down_proj"
    if mlp._forward_hooks or mlp._forward_pre_hooks:
        return f"{cls}.{name} has forward hooks"
    # accelerate's offloading hooks load weights inside the wrapped forwards that our kernels would bypass.
    if any(hasattr(m, "_hf_hook") for m in (block, mlp, *mlp.children())):
        return f"{cls} or its shared expert runs under accelerate hooks (offloading)"
    sg = getattr(block, "shared_expert_gate", None)
    if sg is not None and not (_bias_free_linear(sg) and sg.out_features == 1):
        return f"{cls}.shared_expert_gate is not a bias-free nn.Linear(H, 1)"
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if experts is None or not callable(gate) or not hasattr(experts, "gate_up_proj"):
        return f"{cls} has no `gate` router and transformers `experts` module beside its shared expert"
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if act not in ACT2FN or type(getattr(mlp, "act_fn", None)) is not type(ACT2FN[act]):
        return f"{cls}.{name}'s activation is not the experts' ({act!r})"
    return None


def shared_expert(block: torch.nn.Module) -> SharedExpert:
    """The block's shared expert as our kernels read it (its parameters, read at every call)."""
    mlp = shared_module(block)[1]
    sg = getattr(block, "shared_expert_gate", None)
    return SharedExpert(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                        None if sg is None else sg.weight)


def _reason(block: torch.nn.Module, x: torch.Tensor) -> str | None:
    """Why our kernels cannot run this block on inputs like x (structure, experts coverage, dtypes)."""
    problem = structure_problem(block)
    if problem is not None:
        return problem
    v = coverage.verdict(block.experts, x)
    if v[0] is not None:
        return v[0]
    if v[3][0] == coverage.CLAMPED_SWIGLU:
        return f"{type(block).__name__}: a shared expert beside clamped-SwiGLU experts"
    wdt = block.experts.gate_up_proj.dtype
    sh = shared_expert(block)
    if any(t is not None and t.dtype != wdt for t in (sh.gate, sh.up, sh.down, sh.gate_weight)):
        return f"{type(block).__name__}: shared expert weights in another dtype than the experts' ({wdt})"
    return None


def _fused_block_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs:
        # More than hidden states (DeepSeek-V4's hash-routed blocks take the token ids): what they mean to the
        # router is the block's own business, so its stock forward runs.
        coverage.fallback(f"{type(self).__name__}'s forward takes more than the hidden states", INSTEAD)
        return self._stock_forward(hidden_states, *args, **kwargs)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if (x.shape[0] > DECODE_MAX_TOKENS or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))):
        return self._stock_forward(hidden_states)  # prefill sizes, tracing, training: the stock block
    state = self.__dict__.setdefault("_fused_block_state", {})
    key = (x.dtype, x.device.type)
    reason = state.get(key)  # "" once verified
    if reason is None:
        reason = _reason(self, x)
        if reason is None:
            if capturing(x):
                return self._stock_forward(hidden_states)  # not verified yet, and nothing can be compared now
            # Trials, not the model's forward: observers hooked on the block's modules (router-logit recorders,
            # routing taps) must see one routing per call of the block.
            with hooks_set_aside(self):
                reason = _verify(self, hidden_states, x)
        state[key] = reason
    if reason:
        coverage.fallback(reason, INSTEAD)
        return self._stock_forward(hidden_states)

    def ours() -> torch.Tensor:
        return _ours(self, hidden_states, x)

    bucket = token_bucket(x.shape[0])

    def problem() -> str:
        ex, sh, v = self.experts, shared_expert(self), coverage.verdict(self.experts, x)
        top_k = getattr(self.gate, "top_k", None) or getattr(self, "top_k", "?")
        return (f"block {type(self).__name__} E={ex.gate_up_proj.shape[0]} H={x.shape[1]} "
                f"I={coverage.expert_weights(ex, v).intermediate} k={top_k} {v[3][0]} "
                f"shared={sh.width}{'+gate' if sh.gate_weight is not None else ''} {str(x.dtype)[6:]} T<={bucket}")

    # The timing trials, like the check above, with the block's hooks set aside.
    path = module_path(self, x, (x.dtype, bucket), bucket, problem,
                       lambda: {OURS: ours, STOCK: lambda: self._stock_forward(hidden_states)},
                       trials=lambda: hooks_set_aside(self))
    return ours() if path == OURS else self._stock_forward(hidden_states)


def _ours(block: torch.nn.Module, hidden_states: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The block on our kernels: its router (fused or stock, as dispatched), then the routed and shared experts in
    one call. hidden_states [..., H] -> the same shape and dtype."""
    ex = block.experts
    v = coverage.verdict(ex, x)
    routed = block.gate(x)
    if not (isinstance(routed, tuple) and len(routed) == 3):
        raise ValueError(f"{type(block.gate).__name__} does not return (logits, weights, indices)")
    _, w, idx = routed
    act, alpha, limit = v[3]
    wdt = ex.gate_up_proj.dtype  # under autocast: the matmuls in the weights' dtype, as in the experts backend
    y = fused_experts(x if x.dtype == wdt else x.to(wdt), coverage.expert_weights(ex, v), w, idx, activation=act,
                      swiglu_alpha=alpha, swiglu_limit=limit, shared=shared_expert(block))
    return y.to(hidden_states.dtype).view(hidden_states.shape)


@torch.no_grad()
def _verify(block: torch.nn.Module, hidden_states: torch.Tensor, x: torch.Tensor) -> str:
    """"" when our block gives the stock forward's output on this input, else why not."""
    stock = block._stock_forward(hidden_states)
    if not isinstance(stock, torch.Tensor) or stock.shape != hidden_states.shape:
        return f"{type(block).__name__}'s forward does not return one tensor of its input's shape"
    try:
        ours = _ours(block, hidden_states, x)
    except (ValueError, RuntimeError, TypeError, IndexError) as e:
        return f"{type(block).__name__}: our kernels failed ({str(e)[:120]})"
    ref = stock.double()
    err = ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = VERIFY_TOL.get(x.dtype, 2e-2)
    if not err <= tol:
        return (f"{type(block).__name__} with our shared-expert kernels differs from its stock forward by "
                f"{err:.1e} (> {tol:.0e}): it is not the experts plus shared MLP its structure suggests")
    return ""


def install_fused_blocks(model: torch.nn.Module) -> int:
    """Give every block with a shared expert that our kernels can take the fused forward; returns how many.
    A block's stock forward stays at `_stock_forward` (what runs wherever ours does not)."""
    fused = 0
    for module in model.modules():
        if shared_module(module) is None or not hasattr(module, "experts"):
            continue
        problem = structure_problem(module)
        if problem is not None:
            coverage.fallback(problem, INSTEAD)
            continue
        module.__dict__.pop("_fused_block_state", None)
        fused += install_forward(module, FLAG, _fused_block_forward)
    return fused


def uninstall_fused_blocks(model: torch.nn.Module) -> None:
    """Give every fused block its stock forward back (benchmarks switching providers)."""
    restore_forwards(model, FLAG)
