"""What the teacher's routers do on calibration text: each expert's routing mass per layer.

The routing mass of expert e in a layer is mean over tokens of the weight the router gives e (0 when e is
not among the token's top-k). With renormalised top-k weights (Mixtral) the masses of a layer sum to 1:
they say how much of the layer's output each expert makes, which is what merging methods weight by.
"""
from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def routing_mass(teacher: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean routing weight per (layer, expert) over every token of `batches` (each input_ids [B, S]).

    Returns [L, E] float32. Needs a teacher whose forward returns `router_logits` (Mixtral-class).
    """
    cfg = teacher.config
    k = cfg.num_experts_per_tok
    renorm = getattr(cfg, "norm_topk_prob", True)
    device = next(teacher.parameters()).device
    total: torch.Tensor | None = None
    tokens = 0
    for ids in batches:
        out = teacher(input_ids=ids.to(device), output_router_logits=True, use_cache=False)
        if not getattr(out, "router_logits", None):
            raise ValueError(f"the {cfg.model_type} teacher returns no router logits; routing-weighted "
                             "derivation needs a Mixtral-class teacher")
        layers = []
        for logits in out.router_logits:  # [B*S, E] per layer
            probs = torch.softmax(logits.float(), -1)
            w, idx = probs.topk(k, -1)
            if renorm:
                w = w / w.sum(-1, keepdim=True)
            layers.append(torch.zeros_like(probs).scatter_(-1, idx, w).sum(0))
        batch = torch.stack(layers).cpu()
        total = batch if total is None else total + batch
        tokens += ids.numel()
    if total is None:
        raise ValueError("routing_mass needs at least one batch of calibration tokens")
    return total / tokens
