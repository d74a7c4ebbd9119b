"""Forward hooks set aside for a while: calls made to inspect or time a model are not its forward, and the
observers hooked on it (transformers' output recorders, our routing taps and analytics) must not count them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def hooks_set_aside(model: torch.nn.Module) -> Iterator[None]:
    """Every module's forward and forward-pre hooks under `model` set aside for the duration; hooks registered
    inside are dropped with the temporary tables when the old ones come back."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for m, _, _ in saved:
        m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
    try:
        yield
    finally:
        for m, hooks, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre
