"""What the teacher's routers do on calibration text: each expert's routing mass per layer.

The routing mass of expert e in a layer is mean over tokens of the weight the router gives e (0 when e is
not among the token's top-k), exactly as the MoE block multiplies the expert's output: after the
architecture's own renormalisation and scaling. So a layer's masses sum to the mean total routed weight:
1 for Mixtral (renormalised top-k), less for Qwen2-MoE without renormalisation, `routed_scaling_factor`
for DeepSeek-V3. Merging methods weight experts by the masses and scale the merged FFN by their sum.

The numbers are read from the routers themselves, found and read by structure (teachers/moe_layout.py:
(logits, weights, indices) tuples, Llama 4's sparse scores, ...), one mechanism for every architecture.
A Qwen2-MoE-style sigmoid gate on the shared expert is measured the same way (its mean value per layer), and so
is a factor a block applies to its experts' output after the router (Beam's routed_scaling_factor): the masses
include it, as they include DeepSeek-V3's, which its router applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from core.errors import UnsupportedModelError
from students.calibration import run_with_hooks
from teachers.moe_layout import MoeLayer, decoder_layers
from teachers.routing_tap import Routing, RoutingTap


@dataclass(frozen=True)
class RoutingStats:
    """mass [L, E]: mean routing weight per decoder layer and expert (a zero row for a dense layer);
    shared_gate [L]: mean value of the shared expert's gate, or the factor the block applies to an ungated one
    (1.0 where it is added as it is, or absent)."""

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
    scales = {m.index: _BlockScale(m, others) for m in tap.layers if (others := _other_parts(m)) is not None}
    for scale in scales.values():
        hooks += scale.hooks()
    with tap:
        tokens = run_with_hooks(teacher, batches, hooks, "routing_stats")
    for i, scale in scales.items():
        fit = scale.fit()
        if fit is not None:
            mass[i] *= fit[0]
            if scale.others and not gated[i]:  # an ungated shared part scaled by the block (Cohere2's average)
                gate[i], gated[i] = fit[1] * tokens, True
    shared = torch.where(gated, gate / tokens, torch.ones_like(gate))
    return RoutingStats(mass=(mass / tokens).float(), shared_gate=shared.float())


def _other_parts(layer: MoeLayer) -> list[torch.nn.Module] | None:
    """The block's children other than its experts and routers (its shared experts), when its output can be
    fitted from theirs and the experts': one stacked experts module, no weight directly on the block, no shared
    gate (a per-token gate is measured as such, not fitted). None otherwise."""
    if len(layer.experts) != 1 or isinstance(layer.experts[0], torch.nn.ModuleList):
        return None
    if any(True for _ in layer.block.parameters(recurse=False)) or hasattr(layer.block, "shared_expert_gate"):
        return None
    rel = [p[len(layer.block_path) + 1:] for p in (*layer.expert_paths, *layer.router_paths)]
    others = []
    for name, child in layer.block.named_children():
        if any(r == name or r.startswith(f"{name}.") for r in rel):
            if not any(r == name for r in rel):  # experts or router nested deeper, beside other weights
                return None
            continue
        if any(True for _ in child.parameters()):
            others.append(child)
    return others


class _BlockScale:
    """The factors a block applies to its experts' summed output, and to its shared experts', after the router's
    weights: the least-squares (s, t) in block output = s x experts output + t x shared output over the
    calibration tokens. Beam multiplies the experts' output by `routed_scaling_factor` in the block (DeepSeek-V3
    does it in its router, where the masses already see it); Cohere2-MoE can average experts and shared expert.
    Taken only where the fit is exact (the block does nothing else), else none: the masses then say all."""

    def __init__(self, layer: MoeLayer, others: list[torch.nn.Module]) -> None:
        self.layer, self.others = layer, others
        self.gram = torch.zeros(3, 3, dtype=torch.float64)  # [b, e, h] x [b, e, h] inner products
        self._seen: dict[str, torch.Tensor] = {}
        self._unpaired = False

    def hooks(self) -> list:
        def keep(key: str):
            def fn(_m: torch.nn.Module, _args: tuple, out: object) -> None:
                if isinstance(out, torch.Tensor):
                    self._seen[key] = out.reshape(-1).double() + self._seen.get(key, 0)
            return fn

        def on_block(_m: torch.nn.Module, _args: tuple, out: object) -> None:
            b = out[0] if isinstance(out, tuple) else out
            e, h = self._seen.pop("e", None), self._seen.pop("h", None)
            if not isinstance(b, torch.Tensor) or e is None or e.numel() != b.numel() or (
                    self.others and (h is None or h.numel() != b.numel())):
                self._unpaired = True  # not the same tokens, or a part that did not run: nothing to fit
                return
            v = torch.stack([b.reshape(-1).double(), e, h if h is not None else torch.zeros_like(e)])
            self.gram += v @ v.T
        return ([self.layer.experts[0].register_forward_hook(keep("e"))]
                + [m.register_forward_hook(keep("h")) for m in self.others]
                + [self.layer.block.register_forward_hook(on_block)])

    def fit(self, tolerance: float = 1e-3) -> tuple[float, float] | None:
        """(s, t) where the block's output is s x experts + t x shared to within `tolerance` (relative), else
        None; t is 0 without shared experts."""
        g = self.gram
        if self._unpaired or not (g[0, 0] > 0 and g[1, 1] > 0):
            return None
        n = 2 if self.others else 1
        a, rhs = g[1:1 + n, 1:1 + n], g[1:1 + n, 0]
        try:
            coef = torch.linalg.solve(a, rhs)
        except RuntimeError:  # the shared output a multiple of the experts': no unique fit
            return None
        residual = float((g[0, 0] - 2 * coef @ rhs + coef @ a @ coef).clamp_min(0).sqrt() / g[0, 0].sqrt())
        if residual >= tolerance:
            return None
        return float(coef[0]), float(coef[1]) if n == 2 else 0.0


def routing_mass(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean routing weight per (layer, expert) -> [L, E] float32 (see routing_stats)."""
    return routing_stats(teacher, batches).mass
