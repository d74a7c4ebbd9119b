"""A module's forward replaced by ours and given back: the one way the integrations (shared-expert blocks, norms,
the rotary scope of attention modules) swap forwards, so that the module's own forward is kept exactly once, under one name, however often a model is
enabled again."""
from __future__ import annotations

import types
from typing import Any, Callable

import torch


def install_forward(module: torch.nn.Module, flag: str, forward: Callable[..., Any]) -> bool:
    """Bind `forward` (a function taking the module first) as module.forward; the module's own forward is kept at
    `module._stock_forward` the first time (while `flag` is not set on it), so installing again keeps the original.
    A module already carrying another integration's forward is left as it is (False): ours would call the other
    one as "its own", and that one ours back."""
    owner = getattr(module, "_forward_swap", None)
    if owner is not None and owner != flag and getattr(module, owner, False):
        return False
    if not getattr(module, flag, False):
        module._stock_forward = module.forward
    setattr(module, flag, True)
    module._forward_swap = flag
    module.forward = types.MethodType(forward, module)
    return True


def restore_forwards(model: torch.nn.Module, flag: str) -> None:
    """Give every module under `model` that carries `flag` its own forward back."""
    for module in model.modules():
        if getattr(module, flag, False):
            module.forward = module._stock_forward
            setattr(module, flag, False)
            module._forward_swap = None
