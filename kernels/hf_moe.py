"""Our fused MoE kernels inside transformers: an experts backend registered as `fused_triton` in
`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`, and fused routers installed per architecture; with them
the decoder's RMSNorm modules and rotary embedding on our one-pass kernels (kernels/hf_norms.py,
kernels/hf_rotary.py).

    from kernels.hf_moe import enable_fused_moe
    summary = enable_fused_moe(model)   # one call on a loaded model

Expert biases (`has_bias`) are covered, and so are the custom gate functions in `KNOWN_GATES` (GPT-OSS's clamped
SwiGLU). Cases our kernels do not cover (another custom gate function, no gate projection, a post-expert norm,
expert parallelism, no GPU and no Triton interpreter, ...) run transformers' `grouped_mm` instead, and the reason
is logged once per reason.
Where they cover a case but another path is faster on this GPU (measured once per problem and token-count
bucket, `kernels/dispatch.py`), that path runs: `enable_fused_moe` never makes a model slower than stock.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from transformers.integrations import moe as hf_moe

from kernels import hf_coverage as coverage
from kernels.dispatch import OURS, module_path, token_bucket
from kernels.hf_norms import install_fused_norms
from kernels.hf_rotary import install_fused_rotary
from kernels.hf_shared import install_fused_blocks
from kernels.interpreter import INTERPRETED
from kernels.moe_experts import ExpertWeights, fused_experts
from kernels.moe_router import RouterSpec, route

NAME = "fused_triton"
log = logging.getLogger(__name__)
# Kept under their old names: tests and users' code reach them through this module.
_warned = coverage._warned
_fallback = coverage.fallback
_unsupported = coverage.unsupported
_gate = coverage.gate_of
KNOWN_GATES = coverage.KNOWN_GATES


# Under torch.compile (generate's static-cache decode step, a user's own compile) the stock paths run: routers'
# own forwards and transformers' grouped_mm, which inductor compiles and CUDA graphs capture whole. Ours does not
# trace into one graph (per-module dicts of choices are read and written, launches are sized on the host), and on
# one H200 the compiled decode step of the h100 preset's teacher ran 72 ms per token with it at batch 1 and 60 at
# batch 32, against 3.5 and 10.6 on the stock paths (docs/results/flagship2). Plain, uncompiled calls keep the
# measured choice between ours and stock (kernels/dispatch.py).


def fused_triton_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts-backend signature: hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    if torch.compiler.is_compiling():
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    got = coverage.verdict(self, hidden_states)
    reason, act, alpha, limit = got[0], *got[3]
    if reason is not None:
        _fallback(reason)
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    weights = coverage.expert_weights(self, got)

    def ours() -> torch.Tensor:
        # Under autocast a norm may hand the experts float32 activations with bf16 weights: the matmuls run in
        # the weights' dtype, as autocast would run them, and the result goes back in the input's.
        wdt = self.gate_up_proj.dtype
        x = hidden_states if hidden_states.dtype == wdt else hidden_states.to(wdt)
        return fused_experts(x, weights, top_k_weights, top_k_index, activation=act, swiglu_alpha=alpha,
                             swiglu_limit=limit).to(hidden_states.dtype)

    path = _experts_path(self, weights, hidden_states, top_k_index, top_k_weights, act, ours)
    if path == OURS:
        return ours()
    return STOCK_EXPERTS[path](self, hidden_states, top_k_index, top_k_weights)


STOCK_EXPERTS = {"grouped_mm": hf_moe.grouped_mm_experts_forward, "batched_mm": hf_moe.batched_mm_experts_forward}
# batched_mm gathers each token's k experts' weights ([T * k, 2I, H] and [T * k, H, I]): a candidate only while
# that stays small.
BATCHED_MM_MAX_BYTES = 1 << 30


def _experts_path(module: torch.nn.Module, weights: ExpertWeights, x: torch.Tensor, idx: torch.Tensor,
                  w: torch.Tensor, act: str, ours: Any) -> str:
    """Which path runs this experts call: per (dtype, top-k, token bucket) a dict lookup after the first call.
    The problem key names the activation and, for biased experts, "+bias" (unbiased keys are as they were)."""
    T, k = idx.shape
    E, H, I = weights.num_experts, weights.hidden, weights.intermediate
    bucket = token_bucket(T)

    def candidates() -> dict[str, Any]:
        out = {OURS: ours, "grouped_mm": lambda: hf_moe.grouped_mm_experts_forward(module, x, idx, w)}
        if T * k * 3 * H * I * x.element_size() <= BATCHED_MM_MAX_BYTES:
            out["batched_mm"] = lambda: hf_moe.batched_mm_experts_forward(module, x, idx, w)
        return out

    bias = "+bias" if weights.gate_up_bias is not None else ""
    return module_path(module, x, (x.dtype, k, bucket), bucket,
                       lambda: f"experts E={E} H={H} I={I} k={k} {act}{bias} {str(x.dtype)[6:]} T<={bucket}",
                       candidates)


def register() -> None:
    """Make `fused_triton` a valid `experts_implementation` (idempotent)."""
    if NAME not in hf_moe.ALL_EXPERTS_FUNCTIONS:
        hf_moe.ALL_EXPERTS_FUNCTIONS.register(NAME, fused_triton_experts_forward)


# Router classes by name -> (scoring, renormalise attribute or constant, cast weights to the logits dtype).
# Keyed by name so that no architecture module is imported just to be recognised.
_SOFTMAX_ROUTERS: dict[str, tuple[str | bool, bool]] = {
    "MixtralTopKRouter": (True, False),
    "OlmoeTopKRouter": ("norm_topk_prob", True),
    "Qwen2MoeTopKRouter": ("norm_topk_prob", True),
    "Qwen3MoeTopKRouter": ("norm_topk_prob", True),
}
_SIGMOID_GROUP_ROUTERS = {"DeepseekV3TopkRouter"}


def router_spec(module: torch.nn.Module) -> tuple[RouterSpec, bool] | None:
    """(spec, cast weights to the logits dtype) for a router module we can fuse, else None."""
    name = type(module).__name__
    if name in _SOFTMAX_ROUTERS:
        renorm, cast = _SOFTMAX_ROUTERS[name]
        renorm = bool(getattr(module, renorm)) if isinstance(renorm, str) else renorm
        return RouterSpec(top_k=module.top_k, scoring="softmax", renormalize=renorm), cast
    if name in _SIGMOID_GROUP_ROUTERS:
        spec = RouterSpec(top_k=module.top_k, scoring="sigmoid", renormalize=bool(module.norm_topk_prob),
                          n_group=int(module.num_group), topk_group=int(module.topk_group),
                          scaling=float(module.routed_scaling_factor), fp32_logits=True)
        return spec, False
    return None


def _fused_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[Any, Any, Any]:
    if torch.compiler.is_compiling():  # stock under torch.compile: see above fused_triton_experts_forward
        return self._stock_forward(hidden_states)
    x = hidden_states.reshape(-1, self.hidden_dim)
    if not (x.is_cuda or (INTERPRETED and x.device.type == "cpu")):
        _fallback(f"router input on {x.device.type}")
        return self._stock_forward(hidden_states)
    spec, cast = self._fused_spec
    bias = getattr(self, "e_score_correction_bias", None)

    def ours() -> tuple[Any, Any, Any]:
        return route(x, self.weight, spec, bias=bias if spec.scoring == "sigmoid" else None,
                     weights_dtype=x.dtype if cast else torch.float32)

    bucket = token_bucket(x.shape[0])
    path = module_path(
        self, x, (x.dtype, bucket), bucket,
        lambda: f"router {type(self).__name__} E={self.weight.shape[0]} H={x.shape[1]} k={spec.top_k} "
                f"{str(x.dtype)[6:]} T<={bucket}",
        lambda: {OURS: ours, "stock": lambda: self._stock_forward(hidden_states)})
    return ours() if path == OURS else self._stock_forward(hidden_states)


def install_fused_routers(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Swap every recognised router's forward for the one-kernel version. Returns (fused count, unrecognised
    router class names)."""
    fused, unknown = 0, set()
    for module in model.modules():
        name = type(module).__name__
        if not name.lower().endswith("router") or not hasattr(module, "weight"):
            continue
        got = router_spec(module)
        if got is None:
            unknown.add(name)
            continue
        if getattr(module, "_fused_spec", None) is None:
            module._stock_forward = module.forward
        module._fused_spec = got
        module.forward = types.MethodType(_fused_router_forward, module)
        fused += 1
    for name in sorted(unknown):
        coverage.fallback(f"router {name} is not recognised", "it keeps its stock forward")
    return fused, sorted(unknown)


def enable_fused_moe(model: torch.nn.Module, routers: bool = True, shared: bool = True, norms: bool = True,
                     rotary: bool = True) -> dict[str, Any]:
    """Turn on our kernels for a loaded transformers MoE model: experts backend `fused_triton`, fused routers,
    (`shared`) blocks whose shared expert joins our decode kernels (kernels/hf_shared.py), and the rest of the
    decoder's elementwise work: (`norms`) RMSNorm modules on a one-pass kernel (kernels/hf_norms.py) and
    (`rotary`) the rotary embedding (kernels/hf_rotary.py), each checked against the model's own at first use.

    Whether our kernels cover an experts module is decided at its first forward per input dtype and device type;
    after changing a module's structure (biases, norms, activation), call this again.
    Returns {"experts_implementation", "routers_fused", "routers_unrecognised", "shared_blocks_fused",
    "norms_fused" (modules), "rotary_fused" (modeling modules whose rotary function is replaced)}. Raises
    ValueError for a model whose experts cannot switch implementation (not a transformers MoE with
    `@use_experts_implementation`).
    """
    register()
    for module in model.modules():  # verdicts and paths cached by an earlier call are worked out again
        module.__dict__.pop("_fused_verdicts", None)
        module.__dict__.pop("_fused_paths", None)
        module.__dict__.pop("_fused_block_state", None)
    if not hasattr(model, "set_experts_implementation") or not model._can_set_experts_implementation():
        raise ValueError(f"{type(model).__name__} does not route through transformers' experts interface; "
                         "fused_triton cannot be installed on it")
    model.set_experts_implementation(NAME)
    fused, unknown = install_fused_routers(model) if routers else (0, [])
    blocks = install_fused_blocks(model) if shared else 0
    return {"experts_implementation": NAME, "routers_fused": fused, "routers_unrecognised": unknown,
            "shared_blocks_fused": blocks, "norms_fused": install_fused_norms(model) if norms else 0,
            "rotary_fused": install_fused_rotary(model) if rotary else []}


register()
