"""Layer-wise transfer: each layer of a derived student learns to reproduce the output of the teacher layer it
was derived from, not only the teacher's final distribution.

A derived student's config names, per student layer, the teacher layer it came from (`teacher_layers`,
written by `students.derive`); those pairs start close (same attention weights, merged experts) and the
loss keeps them close while the student compensates for the layers it dropped. The outputs are read with
forward hooks on the decoder layers (the residual stream each layer hands to the next, before the final
norm), registered once for the whole training: hooks per call would break a compiled graph and cost
a Python round trip per layer and micro-batch.

    loss_layers = mean over pairs j of  MSE(h_s, h_t) / mean(h_t^2)        (kind "nmse", the default)
                                   or  MSE(h_s, h_t)                     ("mse")
                                   or  mean over tokens of 1 - cos(h_s, h_t)  ("cosine")
    with h_s = h_student[j], h_t = h_teacher[map[j]].

The residual stream's scale grows with depth and differs between models (SmolLM2's reaches mean squares in the
tens), so a raw MSE's weight means nothing from one model to the next: on the h100 teacher it was 97% of the loss
at weight 0.5 and made the student worse on every task (docs/results/ab_h100). "nmse" divides each pair's MSE by
the teacher layer's mean square (detached): 1.0 is a student layer that outputs zeros.
"""
from __future__ import annotations

from typing import Any

import torch

from core.errors import UserError
from distill.config import LAYER_LOSSES
from teachers.moe_layout import decoder_layers


class LayerMapError(UserError, ValueError):
    """The student has no usable map to the teacher's layers (not derived, or shapes that cannot be matched)."""

    kind = "config"


def layer_map(student: torch.nn.Module, teacher: torch.nn.Module) -> list[int]:
    """The teacher layer index of each student decoder layer, from the student's config (`teacher_layers`),
    checked against both models' depth and width."""
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    mapping = getattr(base.config, "teacher_layers", None)
    if not isinstance(mapping, list) or not mapping:
        raise LayerMapError("distill.layer_weight > 0 needs a derived student (STUDENT=derived): its config names "
                            "the teacher layer of each student layer; this student has no such map")
    n_student, n_teacher = len(decoder_layers(base)[1]), len(decoder_layers(teacher)[1])
    if len(mapping) != n_student or not all(isinstance(i, int) and 0 <= i < n_teacher for i in mapping):
        raise LayerMapError(f"the student's teacher_layers {mapping} do not fit a {n_student}-layer student of a "
                            f"{n_teacher}-layer teacher")
    hs, ht = base.config.hidden_size, teacher.config.hidden_size
    if hs != ht:
        raise LayerMapError(f"layer-wise transfer matches hidden states of one width: the student's is {hs}, the "
                            f"teacher's {ht}")
    return mapping


class LayerTap:
    """Forward hooks on the given decoder layers; `outputs` holds each layer's output [B, S, H] of the latest
    forward, in the order of `layers`. `clear()` before a forward; `remove()` when training ends."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self._slot = {id(m): j for j, m in enumerate(layers)}
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._hooks = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: torch.nn.Module, _args: tuple, out: Any) -> None:
        # With gradient checkpointing a layer runs again in the backward pass: the first output is the one
        # the loss used, so a slot already filled in this forward is left alone.
        j = self._slot[id(module)]
        if self.outputs[j] is None:
            self.outputs[j] = out[0] if isinstance(out, (tuple, list)) else out

    def clear(self) -> None:
        self.outputs = [None] * len(self.outputs)

    def taken(self) -> list[torch.Tensor]:
        """The outputs of the latest forward; raises if a layer did not run (the hooks missed a layer)."""
        if any(o is None for o in self.outputs):
            raise RuntimeError("a tapped decoder layer did not run in the last forward")
        return list(self.outputs)  # type: ignore[arg-type]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def tap_layers(model: torch.nn.Module, indices: list[int] | None = None) -> LayerTap:
    """A LayerTap on the decoder layers of `model` at `indices` (all of them, in order, when None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _, layers = decoder_layers(base)
    return LayerTap([layers[i] for i in (range(len(layers)) if indices is None else indices)])


def layer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "nmse") -> torch.Tensor:
    """Mean over layer pairs of the distance between student[j] and teacher[j] (each [B, S, H]), in float32:
    "nmse" (mean squared difference over the teacher's mean square), "mse" (mean squared difference) or
    "cosine" (mean over tokens of 1 - cosine similarity)."""
    if kind not in LAYER_LOSSES:
        raise ValueError(f"unknown layer loss {kind!r} (available: {', '.join(LAYER_LOSSES)})")
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student and {len(teacher)} teacher layer outputs: need equal, non-zero")
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.detach().float()
        if kind == "nmse":
            terms.append(torch.nn.functional.mse_loss(s, t) / t.square().mean().clamp_min(1e-12))
        elif kind == "mse":
            terms.append(torch.nn.functional.mse_loss(s, t))
        else:
            terms.append((1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean())
    return torch.stack(terms).mean()
