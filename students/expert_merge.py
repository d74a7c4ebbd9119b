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
             ||gate row|| * ||up row|| * ||down column||;
- svd:       low-rank gathering in the residual stream (after Sub-MoE's union decomposition, Li et al. 2025):
             a joint SVD of all experts' mass-weighted projections finds the r hidden-space directions the
             layer's experts read from (gate/up) and write to (down) most; the m-weighted mean of the experts is
             then kept only within those directions. Directions used by few experts with little weight,
             which a plain average turns into noise that pulls on every token, are dropped (width I).
Averaging weights is exact when the experts are equal (a dense model upcycled into experts); so is
selection at any width that is a multiple of I, and svd at full rank (r = H). All are tested on such a teacher.
"""
from __future__ import annotations

import torch

METHODS = ("uniform", "frequency", "select", "svd")


def merge_experts(gate_up: torch.Tensor, down: torch.Tensor, method: str = "uniform",
                  mass: torch.Tensor | None = None, width: int = 0,
                  rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dense FFN from E experts, in float32: the mass-weighted average of the experts' outputs.

    gate_up [E, 2I, H] (gate rows first, then up), down [E, H, I], mass [E] (routing mass, any positive
    scale: it is normalised to sum 1; None: uniform), width: FFN width (0: I; "select" only may change it),
    rank: hidden-space rank kept by "svd" (0: full, H).
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
    hidden = gu.shape[-1]
    if rank and method != "svd":
        raise ValueError(f"svd_rank={rank} applies to method=svd only (got method '{method}')")
    if not 0 <= rank <= hidden:
        raise ValueError(f"svd_rank={rank} must be between 1 and the hidden size {hidden} (0: full rank)")
    if method != "select":
        if width != inter:
            raise ValueError(f"method '{method}' averages experts and keeps their width {inter}; "
                             f"ffn_width={width} needs method=select")
        w = torch.full((e,), 1.0 / e) if method == "uniform" else m
        merged = torch.einsum("e,eoh->oh", w, gu)
        merged_down = torch.einsum("e,ehi->hi", w, dn)
        if method == "svd" and rank and rank < hidden:
            read, write = _shared_hidden_bases(gu, dn, m, rank)
            merged = merged @ read @ read.T  # each neuron reads only within the shared input subspace
            merged_down = write @ (write.T @ merged_down)  # and writes only within the shared output subspace
        return merged[:inter], merged[inter:], merged_down
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
            keep = top_neurons(g, u, dn[ex], rest)
            g, u, d = g[keep], u[keep], d[:, keep]
        gates.append(g)
        ups.append(u)
        downs.append(d)
    return torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1)


def top_neurons(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (sorted) of the n most important neurons of a gated FFN, by ||gate row|| * ||up row|| *
    ||down column||: a bound on how much each can write. gate/up [W, H], down [H, W] -> [n]."""
    return (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).topk(n).indices.sort().values


def _shared_hidden_bases(gate_up: torch.Tensor, down: torch.Tensor, mass: torch.Tensor,
                         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases [H, r] of the hidden directions the experts read from and write to most.

    Each expert's rows enter the joint SVD scaled by sqrt(mass), so the basis explains the mass-weighted
    energy sum_e m_e ||W_e||^2: a direction that only a rarely routed expert uses ranks low.
    gate_up [E, 2I, H], down [E, H, I], mass [E] summing to 1.
    """
    s = mass.sqrt()
    reads = (gate_up * s[:, None, None]).reshape(-1, gate_up.shape[-1])  # [E*2I, H]
    writes = (down * s[:, None, None]).permute(1, 0, 2).reshape(down.shape[1], -1)  # [H, E*I]
    # The H x H Gram matrices are small; their eigenvectors are the singular vectors we need.
    read = torch.linalg.eigh(reads.double().T @ reads.double()).eigenvectors[:, -rank:]
    write = torch.linalg.eigh(writes.double() @ writes.double().T).eigenvectors[:, -rank:]
    return read.float(), write.float()
