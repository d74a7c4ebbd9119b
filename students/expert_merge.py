"""Build one dense gated FFN from one MoE layer's experts.

An MoE layer computes sum_e w_e(x) f_e(x), where the routing weights w_e(x) of the chosen experts sum to 1
(Mixtral renormalises them). A dense FFN cannot route, so every method here approximates
E_x[w_e(x)] f_e(x) summed over e, using the experts' routing mass m_e = mean_x w_e(x) measured on
calibration text (uniform 1/E when none was measured):

- uniform:   the plain mean of the experts' weights (width I);
- frequency: the m-weighted mean of the experts' weights (width I);
- select:    the top experts by score m_e * ||W_down,e|| (routing mass times the size of what the expert
             writes), whole experts concatenated side by side up to `width` neurons, each expert's down
             projection scaled by its share of the selected mass, so the FFN outputs the mass-weighted average
             of the selected experts. The last expert may be cut: its neurons are ranked by
             ||gate row|| * ||up row|| * ||down column||.
Averaging weights is exact when the experts are equal (a dense model upcycled into experts); so is
selection at any width that is a multiple of I. Both are tested on such a teacher.
"""
from __future__ import annotations

import torch

METHODS = ("uniform", "frequency", "select")


def merge_experts(gate_up: torch.Tensor, down: torch.Tensor, method: str = "uniform",
                  mass: torch.Tensor | None = None, width: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dense FFN from E experts, in float32.

    gate_up [E, 2I, H] (gate rows first, then up), down [E, H, I], mass [E] (routing mass, any positive
    scale; None: uniform), width: FFN width (0: I; "select" only may change it).
    Returns gate [W, H], up [W, H], down [H, W].
    """
    if method not in METHODS:
        raise ValueError(f"unknown derivation method '{method}' (available: {', '.join(METHODS)})")
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    width = width or inter
    m = torch.full((e,), 1.0 / e) if mass is None else mass.detach().float().cpu()
    if m.shape != (e,) or (m < 0).any() or m.sum() <= 0:
        raise ValueError(f"routing mass must be [E={e}] non-negative and not all zero, got {tuple(m.shape)}")
    m = m / m.sum()
    gu, dn = gate_up.float(), down.float()
    if method != "select":
        if width != inter:
            raise ValueError(f"method '{method}' averages experts and keeps their width {inter}; "
                             f"ffn_width={width} needs method=select")
        w = m if method == "frequency" else torch.full((e,), 1.0 / e)
        merged = torch.einsum("e,eoh->oh", w, gu)
        return merged[:inter], merged[inter:], torch.einsum("e,ehi->hi", w, dn)
    if not 1 <= width <= e * inter:
        raise ValueError(f"ffn_width={width} must be between 1 and E x I = {e * inter}")
    score = m * dn.flatten(1).norm(dim=1)
    order = score.argsort(descending=True).tolist()
    n_full, rest = divmod(width, inter)
    chosen = order[:n_full + (1 if rest else 0)]
    share = m[chosen] / m[chosen].sum()
    gates, ups, downs = [], [], []
    for j, ex in enumerate(chosen):
        g, u, d = gu[ex, :inter], gu[ex, inter:], dn[ex] * share[j]
        if j == n_full:  # the cut expert: its most important neurons
            importance = g.norm(dim=1) * u.norm(dim=1) * dn[ex].norm(dim=0)
            keep = importance.topk(rest).indices.sort().values
            g, u, d = g[keep], u[keep], d[:, keep]
        gates.append(g)
        ups.append(u)
        downs.append(d)
    return torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1)
