"""Every divergence, on full logits and on a top-k cache, against float64 references written from the
definitions with probabilities (not log-probs), values and gradients."""
from __future__ import annotations

import pytest
import torch

from distill.divergences import DIVERGENCES, divergence
from distill.kd_losses import IGNORE_INDEX, KDLossSpec, full_kd_loss, topk_kd_loss
from logit_cache import topk_from_logits


def _xlogy_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum a log(a / b), with 0 log 0 = 0."""
    return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)


def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """The definitions, on float64 probabilities."""
    if name == "forward_kl":
        return _xlogy_ratio(p, q)
    if name == "reverse_kl":
        return _xlogy_ratio(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _xlogy_ratio(p, m) + (1 - beta) * _xlogy_ratio(q, m)
    if name == "skew_kl":
        return _xlogy_ratio(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return _xlogy_ratio(q, alpha * q + (1 - alpha) * p)
    assert name == "tv"
    return 0.5 * (p - q).abs().sum(-1)


def ref_buckets(t_logits: torch.Tensor, s_logits: torch.Tensor, k: int, temp: float) -> tuple[torch.Tensor, ...]:
    """Teacher and student distributions coarsened to (teacher's top-k ids, everything else), float64."""
    p = torch.softmax(t_logits.double(), -1)
    q = torch.softmax(s_logits.double() / temp, -1)
    ids = p.topk(k, -1).indices
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    # Teacher at temperature T: the cached top-k log-probs and the tail as one pseudo-token, tempered.
    b = torch.cat([p.gather(-1, ids).log(), (p * outside).sum(-1, keepdim=True).log()], -1)
    pb = torch.softmax(b / temp, -1)
    qb = torch.cat([q.gather(-1, ids), (q * outside).sum(-1, keepdim=True)], -1)
    if k == p.shape[-1]:  # no tail: drop the empty bucket (its log 0 would poison the reference's gradient)
        return pb[:, :k], qb[:, :k]
    return pb, qb


def _labels(n: int, v: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = IGNORE_INDEX
    return labels


def _ref_loss(kd: torch.Tensor, s_logits: torch.Tensor, labels: torch.Tensor, spec: KDLossSpec) -> torch.Tensor:
    mask = labels != IGNORE_INDEX
    ce = -torch.log_softmax(s_logits, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    per = spec.kd_weight * spec.temperature**2 * kd + spec.ce_weight * ce
    return (per * mask).sum() / mask.sum()


CASES = [(7, 50, 5, 1.0), (41, 401, 17, 2.0), (3, 1000, 1, 1.0), (5, 64, 63, 0.7), (4, 32, 32, 1.0)]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("n,v,k,temp", CASES)
def test_topk_loss_matches_float64_reference(name: str, n: int, v: int, k: int, temp: float) -> None:
    g = torch.Generator().manual_seed(n * v + k)
    t = torch.randn(n, v, generator=g) * 3
    s = (torch.randn(n, v, generator=g) * 2).requires_grad_()
    labels = _labels(n, v, g)
    spec = KDLossSpec(name, temperature=temp, kd_weight=1.0, ce_weight=0.3, beta=0.4, alpha=0.2)
    ids, lp, tail = topk_from_logits(t, k)
    got = topk_kd_loss(s, labels, ids, lp, tail, spec)
    s64 = s.detach().double().requires_grad_()
    pb, qb = ref_buckets(t, s64, k, temp)
    ref = _ref_loss(ref_divergence(name, pb, qb, 0.4, 0.2), s64, labels, spec)
    assert got["loss"].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    (grad,) = torch.autograd.grad(got["loss"], s)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-3, atol=1e-6), (grad - ref_grad).abs().max()
    per = topk_kd_loss(s.detach(), labels, ids, lp, tail, spec, reduction="none")
    assert per["kd"].shape == (n,) and (per["kd"] >= -1e-6).all()
    assert (per["loss"][labels == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_full_loss_matches_float64_reference(name: str, temp: float) -> None:
    g = torch.Generator().manual_seed(3)
    n, v = 37, 301
    t = torch.randn(n, v, generator=g) * 3
    s = (torch.randn(n, v, generator=g) * 2).requires_grad_()
    labels = _labels(n, v, g)
    spec = KDLossSpec(name, temperature=temp, ce_weight=0.5, beta=0.7, alpha=0.3)
    got = full_kd_loss(s, t, labels, spec)
    s64 = s.detach().double().requires_grad_()
    kd = ref_divergence(name, torch.softmax(t.double() / temp, -1), torch.softmax(s64 / temp, -1), 0.7, 0.3)
    ref = _ref_loss(kd, s64, labels, spec)
    assert got["loss"].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    (grad,) = torch.autograd.grad(got["loss"], s)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-3, atol=1e-6)
    assert full_kd_loss(s, t, labels, spec, reduction="sum")["kd"].item() == pytest.approx(
        (full_kd_loss(s, t, labels, spec, reduction="none")["kd"]).sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_when_student_is_teacher(name: str) -> None:
    t = torch.randn(6, 100)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 4, IGNORE_INDEX, 6])
    ids, lp, tail = topk_from_logits(t, 10)
    spec = KDLossSpec(name, ce_weight=0.0)
    assert topk_kd_loss(t.clone(), labels, ids, lp, tail, spec)["kd"].abs() < 1e-5
    assert full_kd_loss(t.clone(), t, labels, KDLossSpec(name, temperature=2.0))["kd"].abs() < 1e-5
    everything_ignored = torch.full((6,), IGNORE_INDEX)
    assert topk_kd_loss(t, everything_ignored, ids, lp, tail, KDLossSpec(name, ce_weight=1.0))["loss"] == 0


def test_empty_tail_gives_finite_gradients() -> None:
    """k = V: the tail bucket is empty on both sides (log-mass -inf), which must contribute 0, not NaN."""
    t, s = torch.randn(4, 16), torch.randn(4, 16, requires_grad=True)
    ids, lp, tail = topk_from_logits(t, 16)
    assert torch.isinf(tail).all()
    for name in DIVERGENCES:
        out = topk_kd_loss(s, torch.arange(4), ids, lp, tail, KDLossSpec(name, ce_weight=1.0))
        (grad,) = torch.autograd.grad(out["loss"], s)
        assert torch.isfinite(out["loss"]) and torch.isfinite(grad).all(), name


def test_bad_arguments_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="choose one of forward_kl"):
        KDLossSpec("kl")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        divergence("jsd", torch.zeros(1, 2), torch.zeros(1, 2), beta=1.0)
    with pytest.raises(ValueError, match="same vocabulary"):
        full_kd_loss(torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long), KDLossSpec())
