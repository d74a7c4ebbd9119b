"""What the teacher's routers do on calibration text: each expert's routing mass per layer.

The routing mass of expert e in a layer is mean over tokens of the weight the router gives e (0 when e is
not among the token's top-k), exactly as the MoE block multiplies the expert's output: after the
architecture's own renormalisation and scaling. So a layer's masses sum to the mean total routed weight:
1 for Mixtral (renormalised top-k), less for Qwen2-MoE without renormalisation, `routed_scaling_factor`
for DeepSeek-V3. Merging methods weight experts by the masses and scale the merged FFN by their sum.

The numbers are read from the routers themselves, found and read by structure (teachers/moe_layout.py:
(logits, weights, indices) tuples, Llama 4's sparse scores, ...), one mechanism for every architecture.
A Qwen2-MoE-style sigmoid gate on the shared expert is measured the same way (its mean value per layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from core.errors import UnsupportedModelError
from students.calibration import run_with_hooks
from teachers.moe_layout import decoder_layers
from teachers.routing_tap import Routing, RoutingTap


@dataclass(frozen=True)
class RoutingStats:
    """mass [L, E]: mean routing weight per decoder layer and expert (a zero row for a dense layer);
    shared_gate [L]: mean value of the shared expert's gate (1.0 where the shared expert is ungated or absent)."""

    mass: torch.Tensor
    shared_gate: torch.Tensor


@torch.no_grad()
def routing_stats(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> RoutingStats:
    """Routing mass and shared-expert gate per layer over every token of `batches` (each input_ids [B, S]).

    Raises UnsupportedModelError when the teacher's routing weights cannot be read exactly (no router found,
    or one whose output gives no weights: bare logits, an unknown form).
    """
    model_type = teacher.config.model_type
    _, layers = decoder_layers(teacher)

    def unreadable(reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"cannot read the routing weights of this {model_type} teacher ({reason}), which deriving a student "
            "from its experts needs; pass STUDENT=<dense model> or student_options.method=uniform")

    def on_skip(reason: str) -> None:
        raise unreadable(reason)

    def on_routing(j: int, routing: Routing) -> None:
        layer = tap.layers[j]
        if routing.approximate:  # weights recomputed from logits need not be those the block applies
            raise unreadable(f"the router {layer.router_paths[tap.chosen[j]]} returns logits but no weights")
        idx, w = routing.indices.reshape(-1).cpu(), routing.weights.reshape(-1).double().cpu()
        real = idx < layer.num_experts  # 'null' experts carry no FFN to merge
        mass[layer.index].index_add_(0, idx[real], w[real])

    tap = RoutingTap(teacher, on_routing, on_skip)
    problem = tap.static_problem()
    if problem is not None:
        raise unreadable(problem)
    mass = torch.zeros(len(layers), max(m.num_experts for m in tap.layers), dtype=torch.float64)
    gate = torch.zeros(len(layers), dtype=torch.float64)
    gated = torch.zeros(len(layers), dtype=torch.bool)

    def on_gate(i: int):
        def fn(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            gate[i] += torch.sigmoid(out.double()).sum().cpu()
            gated[i] = True
        return fn

    hooks = []
    for m in tap.layers:
        shared_gate = getattr(m.block, "shared_expert_gate", None)
        if shared_gate is not None:
            hooks.append(shared_gate.register_forward_hook(on_gate(m.index)))
    with tap:
        tokens = run_with_hooks(teacher, batches, hooks, "routing_stats")
    shared = torch.where(gated, gate / tokens, torch.ones_like(gate))
    return RoutingStats(mass=(mass / tokens).float(), shared_gate=shared.float())


def routing_mass(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean routing weight per (layer, expert) -> [L, E] float32 (see routing_stats)."""
    return routing_stats(teacher, batches).mass
