"""What the teacher's routers do: tokens per expert per layer, load balance, and specialisation by text source.

`RouterRecorder` hooks every router (teachers/moe_layout.py) while the teacher generates its logit cache and
counts, per MoE layer, text source and expert, the tokens routed there (each token counts once for each of
its top-k experts). Counting happens on the model's device, so it costs no host synchronisation per batch.

From the counts (`summarise`):
- load balance per layer: max/mean of the experts' token shares (1 = perfectly even), their coefficient of
  variation, and the routing entropy normalised by log E (1 = even);
- specialisation per source: the Jensen-Shannon divergence (bits) between the expert shares of that source's
  tokens and those of all tokens, averaged over layers (0 = the source is routed like everything else).
`write_heatmaps` draws the layer x expert load and, for every source, the lift (share / overall share, log2)
at each layer and expert.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from teachers.routing_tap import Routing, RoutingTap

log = logging.getLogger(__name__)


class RouterRecorder:
    """Context manager counting routed tokens per (MoE layer, source, expert) -> `counts` [L, S, E] int64.

    Routers are found and read by structure (`routing_tap.RoutingTap`), whatever form their output takes.
    When the routing of this model cannot be read (no router found, or an output form `read_routing` does not
    know), analytics are skipped: one warning is logged, `skipped` says why, and the model runs untouched.
    """

    def __init__(self, model: torch.nn.Module, sources: list[str]) -> None:
        self.sources = list(sources)
        self.skipped: str | None = None
        self._tap = RoutingTap(model, self._count, self._skip)
        self.layers = [m.index for m in self._tap.layers]
        self.num_experts = max((m.num_experts for m in self._tap.layers), default=1)
        device = next(model.parameters()).device
        self.counts = torch.zeros(len(self.layers), len(self.sources), self.num_experts, dtype=torch.int64,
                                  device=device)
        self._token_source: torch.Tensor | None = None
        problem = self._tap.static_problem()
        if problem is not None:
            self._skip(problem)

    @property
    def approximate(self) -> bool:
        """Whether some layer's routing was read from bare logits (indices exact for top-k routing)."""
        return self._tap.approximate

    def _skip(self, reason: str) -> None:
        if self.skipped is None:
            self.skipped = reason
            log.warning("router analytics skipped: %s", reason)

    def set_batch(self, source_ids: torch.Tensor, seq_len: int) -> None:
        """The source index [B] of each sequence of the next forward, whose sequences have `seq_len` tokens."""
        self._token_source = source_ids.to(self.counts.device).repeat_interleave(seq_len)

    def load_counts(self, counts: torch.Tensor) -> None:
        """Continue from counts saved by an earlier, interrupted run."""
        if counts.shape != self.counts.shape:
            raise ValueError(f"saved router counts {tuple(counts.shape)} do not fit {tuple(self.counts.shape)}")
        self.counts.copy_(counts)

    def _count(self, j: int, routing: Routing) -> None:
        idx = routing.indices.to(self.counts.device)  # [T, k]
        src = self._token_source
        if src is None or src.numel() != idx.shape[0]:
            raise RuntimeError(f"router of layer {self.layers[j]} saw {idx.shape[0]} tokens; set_batch() "
                               f"announced {0 if src is None else src.numel()}")
        rows = src[:, None].expand_as(idx).reshape(-1)
        # 'Null' experts (LongCat's zero-computation ones) add 0; masking them out instead would sync the host.
        real = (idx < self.num_experts).reshape(-1).long()
        self.counts[j].index_put_((rows, idx.clamp_max(self.num_experts - 1).reshape(-1)), real, accumulate=True)

    def __enter__(self) -> "RouterRecorder":
        if self.skipped is None:
            self._tap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tap.__exit__(*exc)


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last dim."""
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-300) / m.clamp_min(1e-300)).log2(), 0.0).sum(-1)

    return (kl(p) + kl(q)) / 2


def summarise(counts: torch.Tensor, layers: list[int], sources: list[str]) -> dict[str, Any]:
    """Load balance and specialisation from counts [L, S, E] (see the module docstring)."""
    c = counts.double().cpu()
    num_experts = c.shape[-1]
    load = c.sum(1)  # [L, E]
    share = load / load.sum(-1, keepdim=True).clamp_min(1)
    mean = share.mean(-1)
    entropy = -torch.where(share > 0, share * share.clamp_min(1e-300).log(), 0.0).sum(-1) / math.log(num_experts)
    per_source_tokens = c.sum((0, 2)) / max(1, c.shape[0])
    spec: dict[str, float] = {}
    for s, name in enumerate(sources):
        if per_source_tokens[s] == 0:
            continue
        dist = c[:, s] / c[:, s].sum(-1, keepdim=True).clamp_min(1)
        spec[name] = float(_js_bits(dist, share).mean())
    return {
        "layers": layers, "experts": num_experts, "sources": sources,
        "tokens_per_expert": load.long().tolist(),
        "tokens_per_source_expert": {name: c[:, s].long().tolist() for s, name in enumerate(sources)},
        "load_max_over_mean": (share.max(-1).values / mean).tolist(),
        "load_cv": (share.std(-1, unbiased=False) / mean).tolist(),
        "routing_entropy": entropy.tolist(),
        "specialisation_js_bits": spec,
        "mean": {"load_max_over_mean": float((share.max(-1).values / mean).mean()),
                 "load_cv": float((share.std(-1, unbiased=False) / mean).mean()),
                 "routing_entropy": float(entropy.mean()),
                 "specialisation_js_bits": float(sum(spec.values()) / len(spec)) if spec else float("nan")},
    }


def write_heatmaps(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """router_load.png (layer x expert token share) and router_sources.png (per source: lift over the overall
    share at each layer and expert, log2). Returns the paths written.

    The figures grow with the number of layers and experts (a cell stays readable up to 64 experts x 48
    layers), every axis is labelled, each colour bar names its unit, and the numbers are written as in the
    report (core.number_format); cells carry their share as text while there are few enough to fit it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from core.number_format import num, pct, ratio

    def _figsize(columns: int, rows: int, col_in: float, row_in: float,
                 extra: tuple[float, float]) -> tuple[float, float]:
        """Inches for a heatmap of `columns` x `rows` cells: cells of col_in x row_in plus room for labels,
        title and colour bar (`extra`), between a readable minimum and a maximum a screen can still show."""
        return (min(22.0, max(6.5, col_in * columns + extra[0])), min(18.0, max(4.2, row_in * rows + extra[1])))

    def _ticks(n: int, most: int) -> list[int]:
        """Every index of n when they fit, else every k-th, so the labels never overlap."""
        step = max(1, math.ceil(n / most))
        return list(range(0, n, step))

    out_dir.mkdir(parents=True, exist_ok=True)
    load = torch.tensor(summary["tokens_per_expert"], dtype=torch.float64)
    share = load / load.sum(-1, keepdim=True).clamp_min(1)
    layers, experts = summary["layers"], summary["experts"]
    fig, ax = plt.subplots(figsize=_figsize(experts, len(layers), 0.55, 0.32, (3.2, 2.2)))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert", fontsize=10)
    ax.set_ylabel("MoE layer", fontsize=10)
    xt, yt = _ticks(experts, 32), _ticks(len(layers), 40)
    ax.set_xticks(xt, [str(i) for i in xt], fontsize=9)
    ax.set_yticks(yt, [str(layers[i]) for i in yt], fontsize=9)
    if experts <= 16 and len(layers) <= 48:
        # Light text on dark cells and dark on light, as the viridis map goes from dark to light.
        mid = float(share.min() + share.max()) / 2
        for (i, j), v in zip(((i, j) for i in range(len(layers)) for j in range(experts)), share.flatten().tolist()):
            ax.text(j, i, pct(v), ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
    m = summary["mean"]
    ax.set_title(f"Share of each layer's routed tokens per expert (even = {pct(1 / experts)})\nmean over layers: "
                 f"max/mean {ratio(m['load_max_over_mean'])}, CV {num(m['load_cv'])},\n"
                 f"routing entropy {num(m['routing_entropy'])} (1 = even)", fontsize=10)
    bar = fig.colorbar(im, ax=ax, format=FuncFormatter(lambda v, _: pct(v)), fraction=0.05, pad=0.03)
    bar.set_label("share of the layer's routed tokens", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    fig.tight_layout()
    paths = [out_dir / "router_load.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    names = [s for s in summary["sources"] if s in summary["specialisation_js_bits"]]
    if names:
        lifts = []
        for s in names:
            c = torch.tensor(summary["tokens_per_source_expert"][s], dtype=torch.float64)
            dist = c / c.sum(-1, keepdim=True).clamp_min(1)
            lifts.append(torch.log2((dist + 1e-9) / (share + 1e-9)).flatten())
        lift = torch.stack(lifts).clamp(-3, 3)
        cols = lift.shape[1]
        fig, ax = plt.subplots(figsize=_figsize(cols, len(names), 0.16, 0.5, (6.0, 2.4)))
        im = ax.imshow(lift.numpy(), aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
        ax.set_yticks(range(len(names)), [f"{s} (JS {num(summary['specialisation_js_bits'][s])} bits)"
                                          for s in names], fontsize=9)
        # One column per (layer, expert), layer-major: a thin line between layers, a tick at each layer's middle.
        for boundary in range(1, len(layers)):
            ax.axvline(boundary * experts - 0.5, color="#444444", lw=0.4)
        lt = _ticks(len(layers), 40)
        ax.set_xticks([i * experts + (experts - 1) / 2 for i in lt], [str(layers[i]) for i in lt], fontsize=8)
        ax.set_xlabel(f"MoE layer (each: its {experts} experts, left to right)", fontsize=10)
        ax.set_title("Do experts specialise by text source? Lift of each expert's share for the source over its "
                     "share for all text", fontsize=10)
        bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        bar.set_label("log2(source share / overall share)\n(+1 = twice as often; clipped at ±3)", fontsize=9)
        bar.ax.tick_params(labelsize=8)
        fig.tight_layout()
        paths.append(out_dir / "router_sources.png")
        fig.savefig(paths[1], dpi=110)
        plt.close(fig)
    return paths
