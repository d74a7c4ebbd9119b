"""Knowledge-distillation loss against a cached top-k teacher distribution, tail mass kept as one bucket.

The cache holds, per token, the teacher's k most likely ids with their log-probs and the log of the mass
outside them. Coarsening both distributions to the same k+1 buckets (k ids + "everything else") gives a
KL that is exact for those buckets and never pretends the tail is zero, which is what the usual
"renormalise the top-k" shortcut does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def student_bucket_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """Student log-probs on the teacher's k ids plus the tail bucket.

    student_logits [N, V], topk_ids [N, k] -> [N, k+1] (last column: log of the mass outside the ids), float32.
    """
    z = student_logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
    top = z.gather(-1, topk_ids) - lse  # [N, k]
    # The tail is computed from the logits outside the ids, not as log(1 - sum p): that loses all precision
    # exactly when the top-k already holds nearly all the mass.
    tail = torch.logsumexp(z.scatter(-1, topk_ids, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([top, tail], dim=-1)


def teacher_bucket_logprobs(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """Teacher log-probs over the k+1 buckets at `temperature`.

    topk_logprobs [N, k], tail_logmass [N] -> [N, k+1]. At T != 1 the tail is tempered as one pseudo-token
    (the cache does not know how its mass splits), an approximation that is exact at T = 1.
    """
    b = torch.cat([topk_logprobs.float(), tail_logmass.float().unsqueeze(-1)], dim=-1)
    return torch.log_softmax(b / temperature, dim=-1)


def topk_forward_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    tail_logmass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(teacher || student) over the k+1 buckets, scaled by T^2 (Hinton et al.).

    student_logits [N, V], topk_ids [N, k], topk_logprobs [N, k], tail_logmass [N] -> [N] float32.
    """
    lq = student_bucket_logprobs(student_logits, topk_ids, temperature)
    lp = teacher_bucket_logprobs(topk_logprobs, tail_logmass, temperature)
    # A bucket the teacher gives no mass (an empty tail when k = V) contributes 0, not 0 * -inf.
    return torch.where(lp == float("-inf"), 0.0, lp.exp() * (lp - lq)).sum(-1) * temperature**2


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                      topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, kd_weight: float,
                      ce_weight: float, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """`kd_weight * KD + ce_weight * CE`, averaged over positions whose label is not -100.

    student_logits [N, V], labels [N] (next-token ids, -100 to ignore), topk_* [N, k], tail_logmass [N].
    Returns scalars `loss`, `kd`, `ce`.
    """
    mask = labels != -100
    n = mask.sum().clamp(min=1)
    kd = (topk_forward_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature) * mask).sum() / n
    ce = F.cross_entropy(student_logits.float(), labels, ignore_index=-100, reduction="sum") / n
    return {"loss": kd_weight * kd + ce_weight * ce, "kd": kd.detach(), "ce": ce.detach()}
