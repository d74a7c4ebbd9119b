"""The distillation loss: a divergence to the teacher, at a temperature, mixed with hard-label cross-entropy.

Two teacher forms share every formula:
- full logits (online teacher): the divergence runs over the whole vocabulary;
- a top-k cache (ids, log-probs, log tail mass): both distributions are coarsened to the same k+1 buckets
  (the k ids and "everything else"). The divergence is then exact for those buckets and never pretends the
  tail is zero, which the usual "renormalise the top-k" shortcut does.

For the cache form the student enters only through four per-token statistics (`StudentStats`): its logits
on the k ids, the logsumexp of the other logits at T and at 1, and its logit on the label. The fused
kernel (`distill/fused_linear_kd.py`) computes those statistics without ever holding [tokens, vocab] logits
and then differentiates `topk_loss_from_stats` on these small tensors; the unfused path computes them with
plain PyTorch from full logits. One formula, two ways to get its inputs.

Loss per token: kd_weight * T^2 * D(p_T || q_T) + ce_weight * CE(label). Positions whose label is
`ignore_index` contribute nothing (and to CE nothing either); means are over the other positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from distill.divergences import check_divergence, divergence

IGNORE_INDEX = -100


@dataclass(frozen=True)
class KDLossSpec:
    """What the loss computes; the trainer builds it from `DistillConfig`."""
    divergence: str = "forward_kl"  # one of distill.divergences.DIVERGENCES
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    beta: float = 0.5  # jsd: weight of the teacher in the mixture
    alpha: float = 0.1  # skew_kl / skew_reverse_kl: weight of the skewed-towards side

    def __post_init__(self) -> None:
        check_divergence(self.divergence, self.beta, self.alpha)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight must be >= 0 and not both 0")


class StudentStats(NamedTuple):
    """What the top-k loss needs from the student, per token (N tokens, k cached ids)."""
    z_top: torch.Tensor  # [N, k] student logits on the teacher's ids (raw, not divided by T)
    lse_rest_t: torch.Tensor  # [N] logsumexp over the other ids of logits / T (-inf when k = V)
    lse_rest_1: torch.Tensor  # [N] the same at T = 1 (for cross-entropy)
    z_label: torch.Tensor  # [N] student logit on the label (0 where ignored)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _combine(kd: torch.Tensor, ce: torch.Tensor, labels: torch.Tensor, spec: KDLossSpec,
             reduction: str) -> dict[str, torch.Tensor]:
    mask = labels != IGNORE_INDEX
    kd = torch.where(mask, kd, 0.0)
    ce = torch.where(mask, ce, 0.0)
    loss = spec.kd_weight * kd + spec.ce_weight * ce
    return {"loss": _reduce(loss, mask, reduction), "kd": _reduce(kd, mask, reduction).detach(),
            "ce": _reduce(ce, mask, reduction).detach()}


def teacher_bucket_logprobs(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """Teacher log-probs over the k+1 buckets at `temperature`.

    topk_logprobs [N, k], tail_logmass [N] -> [N, k+1] float32. At T != 1 the tail is tempered as one
    pseudo-token (the cache does not know how its mass splits), an approximation that is exact at T = 1.
    """
    b = torch.cat([topk_logprobs.float(), tail_logmass.float().unsqueeze(-1)], dim=-1)
    return torch.log_softmax(b / temperature, dim=-1)


def student_stats(student_logits: torch.Tensor, topk_ids: torch.Tensor, labels: torch.Tensor,
                  temperature: float) -> StudentStats:
    """`StudentStats` from full student logits, differentiably, in float32.

    student_logits [N, V], topk_ids [N, k], labels [N].
    """
    z = student_logits.float()
    rest = z.scatter(-1, topk_ids, float("-inf"))
    # The tail is a logsumexp over the logits outside the ids, not log(1 - sum p): the latter loses all
    # precision exactly when the top-k already holds nearly all the mass.
    return StudentStats(z.gather(-1, topk_ids), torch.logsumexp(rest / temperature, -1), torch.logsumexp(rest, -1),
                        z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1))


def student_bucket_logprobs(stats: StudentStats, temperature: float) -> torch.Tensor:
    """Student log-probs at `temperature` on the teacher's k ids plus the tail bucket: [N, k+1]."""
    a = stats.z_top / temperature
    lse = torch.logaddexp(stats.lse_rest_t, torch.logsumexp(a, -1))
    return torch.cat([a - lse.unsqueeze(-1), (stats.lse_rest_t - lse).unsqueeze(-1)], -1)


def topk_loss_from_stats(stats: StudentStats, labels: torch.Tensor, topk_logprobs: torch.Tensor,
                         tail_logmass: torch.Tensor, spec: KDLossSpec,
                         reduction: str = "mean") -> dict[str, torch.Tensor]:
    """The top-k cache loss from the student's statistics.

    stats: N tokens; labels [N] (IGNORE_INDEX to skip), topk_logprobs [N, k], tail_logmass [N].
    Returns `loss` (differentiable), `kd`, `ce` (detached): scalars, or [N] with reduction="none".
    """
    t = spec.temperature
    kd = t * t * divergence(spec.divergence, teacher_bucket_logprobs(topk_logprobs, tail_logmass, t),
                            student_bucket_logprobs(stats, t), spec.beta, spec.alpha)
    lse_1 = torch.logaddexp(stats.lse_rest_1, torch.logsumexp(stats.z_top, -1))
    return _combine(kd, lse_1 - stats.z_label, labels, spec, reduction)


def topk_kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, spec: KDLossSpec,
                 reduction: str = "mean") -> dict[str, torch.Tensor]:
    """The loss against a top-k cache, from full student logits (holds [N, V] in float32).

    student_logits [N, V], labels [N], topk_ids [N, k], topk_logprobs [N, k], tail_logmass [N].
    """
    stats = student_stats(student_logits, topk_ids, labels, spec.temperature)
    return topk_loss_from_stats(stats, labels, topk_logprobs, tail_logmass, spec, reduction)


def full_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 spec: KDLossSpec, reduction: str = "mean") -> dict[str, torch.Tensor]:
    """The loss against the teacher's full logits (online teacher, same vocabulary).

    student_logits [N, V], teacher_logits [N, V], labels [N]. Holds several [N, V] float32 tensors: for
    long batches, take the teacher's top-k and use the fused top-k loss instead.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models need the same vocabulary")
    t = spec.temperature
    z = student_logits.float()
    lq = torch.log_softmax(z / t, -1)
    lp = torch.log_softmax(teacher_logits.float() / t, -1)
    kd = t * t * divergence(spec.divergence, lp, lq, spec.beta, spec.alpha)
    ce = torch.nn.functional.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return _combine(kd, ce, labels, spec, reduction)
