"""What the teacher's routers do on calibration text: each expert's routing mass per layer.

The routing mass of expert e in a layer is mean over tokens of the weight the router gives e (0 when e is
not among the token's top-k), exactly as the MoE block multiplies the expert's output: after the
architecture's own renormalisation and scaling. So a layer's masses sum to the mean total routed weight:
1 for Mixtral (renormalised top-k), less for Qwen2-MoE without renormalisation, `routed_scaling_factor`
for DeepSeek-V3. Merging methods weight experts by the masses and scale the merged FFN by their sum.

The numbers are read from the routers themselves (teachers/routers.py: every transformers 5 router returns
(logits, top-k weights, top-k indices)), one mechanism for every architecture that follows the interface.
A Qwen2-MoE-style sigmoid gate on the shared expert is measured the same way (its mean value per layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from students.calibration import run_with_hooks
from teachers.routers import find_routers, router_experts


@dataclass(frozen=True)
class RoutingStats:
    """mass [L, E]: mean routing weight per decoder layer and expert (a zero row for a dense layer);
    shared_gate [L]: mean value of the shared expert's gate (1.0 where the shared expert is ungated or absent)."""

    mass: torch.Tensor
    shared_gate: torch.Tensor


@torch.no_grad()
def routing_stats(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> RoutingStats:
    """Routing mass and shared-expert gate per layer over every token of `batches` (each input_ids [B, S])."""
    layers = teacher.get_decoder().layers
    routers = find_routers(teacher)
    num_experts = max((router_experts(r) for _, r in routers), default=0)
    if not num_experts:
        raise ValueError(f"no router modules found in the {teacher.config.model_type} teacher: routing-weighted "
                         "derivation needs a transformers 5 MoE whose routers return (logits, weights, indices)")
    mass = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    gate = torch.zeros(len(layers), dtype=torch.float64)
    gated = torch.zeros(len(layers), dtype=torch.bool)

    def on_router(i: int):
        def fn(_mod: torch.nn.Module, _args: tuple, out: Any) -> None:
            if not (isinstance(out, tuple) and len(out) == 3):
                raise ValueError(f"router of layer {i} returns {type(out).__name__}, not (logits, weights, indices)")
            _, w, idx = out
            mass[i].index_add_(0, idx.reshape(-1).cpu(), w.reshape(-1).double().cpu())
        return fn

    def on_gate(i: int):
        def fn(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            gate[i] += torch.sigmoid(out.double()).sum().cpu()
            gated[i] = True
        return fn

    hooks = [r.register_forward_hook(on_router(i)) for i, r in routers]
    for i, layer in enumerate(layers):
        shared_gate = getattr(getattr(layer, "mlp", None), "shared_expert_gate", None)
        if shared_gate is not None:
            hooks.append(shared_gate.register_forward_hook(on_gate(i)))
    tokens = run_with_hooks(teacher, batches, hooks, "routing_stats")
    shared = torch.where(gated, gate / tokens, torch.ones_like(gate))
    return RoutingStats(mass=(mass / tokens).float(), shared_gate=shared.float())


def routing_mass(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean routing weight per (layer, expert) -> [L, E] float32 (see routing_stats)."""
    return routing_stats(teacher, batches).mass
