"""An experts implementation for training an MoE with fp32 master weights under bf16 autocast.

torch's grouped_mm is not autocast-aware. With fp32 master weights, transformers' `grouped_mm` path casts
the tokens to the *weights'* dtype, so the experts run in fp32, and in an upcycled SmolLM2 they are three
quarters of the FLOPs. `bench/preset_probe.py` measured the teacher's training at 20k tokens/s on one H100
that way, against 197k tokens/s for its bf16 forward.

`autocast_experts` casts the stacked expert weights to the autocast dtype for the call, as autocast does
for an nn.Linear weight, and then runs transformers' own grouped_mm forward. The cast is differentiable, so
the gradients reach the fp32 masters. Outside autocast it is transformers' grouped_mm unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.integrations import moe as hf_moe

NAME = "grouped_mm_autocast"


class _CastView:
    """The experts module as grouped_mm_experts_forward reads it, with its float weights in `dtype`."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        self._module, self._dtype = module, dtype

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name.endswith(("_proj", "_bias")):
            return value.to(self._dtype)
        return value


def autocast_experts(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts-backend signature: hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]
    (in the autocast dtype under autocast, else in hidden's dtype)."""
    kind = hidden_states.device.type
    if not torch.is_autocast_enabled(kind):
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    dtype = torch.get_autocast_dtype(kind)
    return hf_moe.grouped_mm_experts_forward(_CastView(self, dtype), hidden_states.to(dtype), top_k_index,
                                             top_k_weights.to(dtype))


def register() -> None:
    """Make `grouped_mm_autocast` a valid `experts_implementation` (idempotent)."""
    if NAME not in hf_moe.ALL_EXPERTS_FUNCTIONS:
        hf_moe.ALL_EXPERTS_FUNCTIONS.register(NAME, autocast_experts)
