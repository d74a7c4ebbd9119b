"""The divergences a student can be distilled with, on two log-probability vectors over the same support.

The support is whatever both sides agree on: the full vocabulary (online teacher) or the k+1 buckets of a
top-k cache (k ids and the tail). Inputs are log-probs, not probs, so that a bucket holding 1e-30 of the
mass keeps its precision. All of them are >= 0 and are 0 when the two distributions are equal.

- forward_kl        KL(p || q): mean-seeking, the classic Hinton loss.
- reverse_kl        KL(q || p): mode-seeking (MiniLLM).
- jsd               beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD's generalised JSD).
- skew_kl           KL(p || alpha p + (1 - alpha) q) (DistiLLM): bounded where q has no mass.
- skew_reverse_kl   KL(q || alpha q + (1 - alpha) p).
- tv                total variation, 1/2 sum |p - q|.
p is the teacher, q the student.
"""
from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")

# Log-probs are clamped here before use: exp(-1e4) is 0 in any float format, so an empty bucket (the tail when
# k = V) contributes exactly 0, and no 0 * inf turns into a NaN gradient.
_LOG_FLOOR = -1.0e4


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return (lp.exp() * (lp - lq)).sum(-1)


def _mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a and log b."""
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def check_divergence(name: str, beta: float, alpha: float) -> None:
    """The divergence's arguments, checked once for every caller (the loss spec, the config, direct calls):
    a known name, and the mixture weights in (0, 1), where at 0 or 1 jsd and the skews degenerate."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if name == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (at 0 or 1 it is identically zero)")
    if name in ("skew_kl", "skew_reverse_kl") and not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} needs 0 < alpha < 1, got {alpha}")


def divergence(name: str, lp: torch.Tensor, lq: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher log-probs `lp` and student log-probs `lq`.

    lp, lq [..., B] (B: vocabulary or buckets, both normalised over B) -> [...] float32 or float64 (lq's dtype).
    `beta` is the JSD mixture weight on the teacher, `alpha` the skew weight, both in (0, 1).
    """
    check_divergence(name, beta, alpha)
    lp = lp.to(lq.dtype).clamp_min(_LOG_FLOOR)
    lq = lq.clamp_min(_LOG_FLOOR)
    if name == "forward_kl":
        return _kl(lp, lq)
    if name == "reverse_kl":
        return _kl(lq, lp)
    if name == "tv":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if name == "jsd":
        lm = _mix(lp, lq, beta)
        return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    if name == "skew_kl":
        return _kl(lp, _mix(lp, lq, alpha))
    return _kl(lq, _mix(lq, lp, alpha))  # skew_reverse_kl
