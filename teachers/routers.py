"""Where a transformers 5 MoE keeps its routers.

Every MoE family in transformers 5 routes through a module whose class name ends in "Router"
(MixtralTopKRouter, Qwen2MoeTopKRouter, DeepseekV3TopkRouter, GptOssTopKRouter, PhimoeTopKRouter, ...), and
each returns (router logits [T, E], top-k weights [T, k], top-k expert indices [T, k]), the weights being
exactly those the block multiplies its experts' outputs by. Finding routers by that interface, rather than
by a list of architectures, is what lets analytics and derivation work on families not named anywhere here.
"""
from __future__ import annotations

import torch


def is_router(module: torch.nn.Module) -> bool:
    return type(module).__name__.lower().endswith("router")


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router) for every routed layer, in order; dense layers have none."""
    layers = model.get_decoder().layers
    found = []
    for i, layer in enumerate(layers):
        found += [(i, m) for m in layer.modules() if is_router(m)]
    return found


def router_experts(router: torch.nn.Module) -> int:
    """Number of experts a router chooses among (rows of its weight [E, H])."""
    n = getattr(router, "num_experts", None) or getattr(router, "n_routed_experts", None)
    return int(n) if n else int(router.weight.shape[0])
