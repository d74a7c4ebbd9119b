"""The fused linear + top-k KD loss against the unfused loss on materialised logits (itself checked against
float64 in test_kd_losses.py): loss values and the gradients of hidden states and output weight.

On CPU the Triton row kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
this exercises the same kernel code as the GPU; on a GPU machine they run compiled, in bf16 as well.
"""
from __future__ import annotations

import pytest
import torch

from distill.divergences import DIVERGENCES
from distill.fused_linear_kd import fused_linear_topk_kd
from distill.kd_losses import IGNORE_INDEX, KDLossSpec, topk_kd_loss
from kernels.kd_loss import rest_grad_, row_lse
from logit_cache import topk_from_logits

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(n: int, h: int, v: int, k: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) / h**0.25
    weight = torch.randn(v, h, generator=g) / h**0.25
    ids, lp, tail = topk_from_logits(torch.randn(n, v, generator=g) * 3, k)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::4] = IGNORE_INDEX
    put = lambda x: x.to(DEV)  # noqa: E731
    return (put(hidden.to(dtype)).requires_grad_(), put(weight.to(dtype)).requires_grad_(), put(labels), put(ids),
            put(lp), put(tail))


def _unfused(hidden, weight, labels, ids, lp, tail, spec):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    out = topk_kd_loss((h @ w.t()).float(), labels, ids, lp, tail, spec)
    gh, gw = torch.autograd.grad(out["loss"], [h, w])
    return out, gh, gw


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("n,h,v,k,temp,chunk", [(41, 37, 401, 7, 1.0, 16), (9, 64, 1271, 32, 2.0, 4),
                                                (1, 16, 50, 50, 1.0, 8), (12, 24, 97, 1, 0.5, 12)])
def test_fused_matches_unfused(name: str, n: int, h: int, v: int, k: int, temp: float, chunk: int) -> None:
    hidden, weight, labels, ids, lp, tail = _inputs(n, h, v, k, seed=n + v)
    spec = KDLossSpec(name, temperature=temp, kd_weight=1.0, ce_weight=0.4, beta=0.3, alpha=0.25)
    got = fused_linear_topk_kd(hidden, weight, labels, ids, lp, tail, spec, chunk_rows=chunk)
    got["loss"].backward()
    ref, ref_gh, ref_gw = _unfused(hidden, weight, labels, ids, lp, tail, spec)
    for key in ("loss", "kd", "ce"):
        assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-4, abs=1e-5), key
    assert torch.allclose(hidden.grad.double(), ref_gh, rtol=1e-3, atol=1e-5), (hidden.grad - ref_gh).abs().max()
    assert torch.allclose(weight.grad.double(), ref_gw, rtol=1e-3, atol=1e-5), (weight.grad - ref_gw).abs().max()


def test_sum_none_and_no_grad() -> None:
    hidden, weight, labels, ids, lp, tail = _inputs(10, 8, 60, 4, seed=5)
    spec = KDLossSpec("jsd", ce_weight=1.0)
    per = fused_linear_topk_kd(hidden, weight, labels, ids, lp, tail, spec, reduction="none")
    total = fused_linear_topk_kd(hidden, weight, labels, ids, lp, tail, spec, reduction="sum")
    assert per["loss"].shape == (10,) and not per["loss"].requires_grad
    assert total["loss"].item() == pytest.approx(per["loss"].sum().item(), rel=1e-5)
    assert (per["loss"][labels == IGNORE_INDEX] == 0).all()
    with torch.no_grad():
        ev = fused_linear_topk_kd(hidden, weight, labels, ids, lp, tail, spec)
    assert not ev["loss"].requires_grad
    assert ev["loss"].item() == pytest.approx(per["loss"].sum().item() / (labels != IGNORE_INDEX).sum().item(),
                                              rel=1e-5)


def test_frozen_output_layer_gets_no_gradient() -> None:
    """LoRA students freeze lm_head: no [V, H] gradient is built for it."""
    hidden, weight, labels, ids, lp, tail = _inputs(6, 8, 40, 3, seed=2)
    weight.requires_grad_(False)
    fused_linear_topk_kd(hidden, weight, labels, ids, lp, tail, KDLossSpec())["loss"].backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 GEMMs: GPU only")
def test_fused_bf16_close_to_float32_reference() -> None:
    hidden, weight, labels, ids, lp, tail = _inputs(300, 256, 5003, 64, seed=11, dtype=torch.bfloat16)
    spec = KDLossSpec("forward_kl", ce_weight=0.5)
    got = fused_linear_topk_kd(hidden, weight, labels, ids, lp, tail, spec, chunk_rows=128)
    got["loss"].backward()
    ref, ref_gh, ref_gw = _unfused(hidden, weight, labels, ids, lp, tail, spec)
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)
    for g, r in ((hidden.grad, ref_gh), (weight.grad, ref_gw)):
        rel = (g.double() - r).norm() / r.norm()
        assert rel < 2e-2, rel


@pytest.mark.parametrize("temp", [1.0, 1.5])
def test_row_kernels_against_torch(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 9000, generator=g) * 4
    z[0, :] = float("-inf")  # a row with nothing left (k = V)
    z[1, ::7] = float("-inf")
    z = z.to(DEV)
    lse_t, lse_1 = row_lse(z, temp)
    ref_t, ref_1 = torch.logsumexp(z / temp, -1), torch.logsumexp(z, -1)
    assert torch.equal(torch.isinf(lse_t), torch.isinf(ref_t))
    fin = torch.isfinite(ref_t)
    assert torch.allclose(lse_t[fin], ref_t[fin], atol=1e-4) and torch.allclose(lse_1[fin], ref_1[fin], atol=1e-4)
    c_t, c_1 = torch.randn(5, generator=g).to(DEV), torch.randn(5, generator=g).to(DEV)
    ref = c_t[:, None] * torch.exp(z / temp - ref_t[:, None])
    if temp != 1.0:
        ref += c_1[:, None] * torch.exp(z - ref_1[:, None])
    got = rest_grad_(z.clone(), lse_t, lse_1, c_t, c_1, temp)
    assert torch.allclose(got[fin], ref[fin], atol=1e-6) and (got[0] == 0).all()
