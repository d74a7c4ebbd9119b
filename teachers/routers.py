"""Where an MoE keeps its routers: found by structure (teachers/moe_layout.py), not by class names.

A router is what an MoE block calls to choose experts: a module outside the experts holding an [E, H]
projection. Families name and shape them differently (MixtralTopKRouter, HunYuan's `gate` wrapping `wg`,
Llama 4's `router` returning sparse scores, JetMoE's gating returning a dispatch plan); what they return is
read by `routing_tap.read_routing`. Finding them by where the experts are, rather than by a list of
architectures, is what lets analytics and derivation work on families not named anywhere here.
"""
from __future__ import annotations

import torch

from teachers.moe_layout import moe_layers


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router) for every routed layer whose router could be found, in order; dense
    layers have none. The router is the static best guess (`MoeLayer.router`); `routing_tap.RoutingTap`
    confirms it from its output at the first forward."""
    return [(m.index, m.router) for m in moe_layers(model) if m.router is not None]


def router_experts(router: torch.nn.Module, model: torch.nn.Module | None = None) -> int:
    """Number of experts a router chooses among: that of its MoE layer when `model` is given, else the
    router's own `num_experts` / `n_routed_experts`, else the rows of its (or its first) [E, H] weight."""
    if model is not None:
        for m in moe_layers(model):
            if any(r is router for r in m.routers):
                return m.num_experts
    n = getattr(router, "num_experts", None) or getattr(router, "n_routed_experts", None)
    if isinstance(n, int) and n > 0:
        return n
    weights = [p for p in router.parameters() if p.dim() == 2]
    if not weights:
        raise ValueError(f"{type(router).__name__} has no [E, H] weight to count its experts by")
    return int(weights[0].shape[0])
