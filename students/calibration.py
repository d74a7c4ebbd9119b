"""Run a model over calibration text with forward hooks that collect statistics, then remove the hooks."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm


@torch.no_grad()
def run_with_hooks(model: torch.nn.Module, batches: Iterable[torch.Tensor], hooks: list[RemovableHandle],
                   what: str) -> int:
    """Forward every batch (input_ids [B, S]) without a KV cache; the hooks are removed even on error.

    Returns the number of tokens seen; raises ValueError naming `what` when there were none.
    """
    tokens = 0
    try:
        device = next(model.parameters()).device
        batches = list(batches)
        for ids in tqdm(batches, desc=what, unit="batch", leave=False):
            model(input_ids=ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise ValueError(f"{what} needs at least one batch of calibration tokens")
    return tokens
