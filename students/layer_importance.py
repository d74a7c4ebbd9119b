"""Which layers matter: block influence measured on calibration text (ShortGPT, Men et al. 2024).

The influence of a decoder layer is mean over tokens of 1 - cos(h_in, h_out): a layer whose output points
where its input did changes little and is the first to drop. `keep_layers="top_<n>"` keeps the n most
influential layers (always including the last), in their original order.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from students.calibration import run_with_hooks
from teachers.moe_layout import decoder_layers


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def block_influence(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Influence per decoder layer over every token of `batches` (each input_ids [B, S]) -> [L] float32."""
    _, layers = decoder_layers(model)
    sums = torch.zeros(len(layers))
    hooks = []

    def hook(i: int):
        def fn(_mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos = torch.nn.functional.cosine_similarity(x_in.float(), _hidden(out).float(), dim=-1)
            sums[i] += (1 - cos).sum().cpu()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    return sums / run_with_hooks(model, batches, hooks, "block_influence")


def most_influential(influence: torch.Tensor, n: int) -> list[int]:
    """The n layers of highest influence, always including the last, sorted. influence [L]."""
    num = influence.numel()
    if not 1 <= n <= num:
        raise ValueError(f"keep_layers top_{n}: n must be between 1 and the teacher's {num} layers; "
                         f"set SET=\"student_options.keep_layers=top_<n>\" (or top_<p>%, every_<n>) for this teacher")
    rest = influence[:-1].argsort(descending=True)[:n - 1].tolist()
    return sorted(rest + [num - 1])
