"""The distillation loss fused with the student's output layer: never holds [tokens, vocab] logits.

    loss = fused_linear_topk_kd(hidden, lm_head.weight, labels, topk_ids, topk_logprobs, tail_logmass, spec)
    loss["loss"].backward()

Per chunk of rows it computes z = h W^T (one GEMM), reads the teacher-id logits and the label logit out,
writes -inf over the teacher ids, and takes the logsumexp of the rest (kernels/kd_loss.row_lse). Those
statistics are all the top-k loss needs (distill/kd_losses.StudentStats), so the loss and its gradient
with respect to them come from autograd on [C, k+1] tensors, whatever the divergence. The gradient on the
other V-k logits is a rescaled softmax (kernels/kd_loss.rest_grad_), written over z in place; the exact
top-k and label gradients are scattered in; then two GEMMs give dL/dh and accumulate dL/dW. All of this
happens in the forward, as in Liger-Kernel's fused linear losses: the backward only scales the stored
gradients by the incoming scalar. Peak extra memory: one [C, V] chunk, dL/dW in float32, dL/dh.

On CPU the same loop runs with plain PyTorch row operations (and float32 GEMMs when the inputs are).
"""
from __future__ import annotations

from typing import Any

import torch

from distill.kd_losses import IGNORE_INDEX, KDLossSpec, StudentStats, topk_loss_from_stats
from kernels.kd_loss import rest_grad_, row_lse

# Bytes of logits per chunk: 16k tokens x 152k vocab in bf16 is 5 GB. With 1 GiB chunks the extra memory
# stays under 10% of the unfused loss's while the per-chunk dL/dW accumulation (a read and write of [V, H]
# float32) stays small next to the GEMMs; 256 MiB chunks are 1.8x slower on an H100 (bench/results/).
DEFAULT_CHUNK_BYTES = 1024**3


def _mm_into_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with a float32 accumulator, without a float32 copy of a or b where the backend allows."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:  # cuBLAS reads and writes the float32 accumulator itself: no copy of [V, H]
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _chunk_grads(z: torch.Tensor, h_c: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                 lp: torch.Tensor, tail: torch.Tensor, spec: KDLossSpec, scale: float,
                 grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-token loss terms of one chunk; writes dL/dh into grad_h [C, H] and adds dL/dW into grad_w.
    z [C, V] holds the chunk's logits and is overwritten with their gradient."""
    t = spec.temperature
    lab = labels.clamp(min=0).unsqueeze(-1)
    z_top = z.gather(1, ids).float().requires_grad_()
    z_label = z.gather(1, lab).float().squeeze(-1).requires_grad_()
    z.scatter_(1, ids, float("-inf"))
    lse_t, lse_1 = row_lse(z, t)
    # Two leaves even at T = 1 (where row_lse returns one tensor): the KD and CE gradients are added below.
    lse_t, lse_1 = lse_t.requires_grad_(), lse_1.clone().requires_grad_()
    if grad_h is None and grad_w is None:  # evaluation only
        return topk_loss_from_stats(StudentStats(z_top, lse_t, lse_1, z_label), labels, lp, tail, spec, "none")
    with torch.enable_grad():
        out = topk_loss_from_stats(StudentStats(z_top, lse_t, lse_1, z_label), labels, lp, tail, spec, "none")
        g_top, g_t, g_1, g_label = torch.autograd.grad((out["loss"] * scale).sum(), [z_top, lse_t, lse_1, z_label],
                                                       allow_unused=True, materialize_grads=True)
    if t == 1.0:
        rest_grad_(z, lse_t.detach(), lse_1.detach(), g_t + g_1, g_1, t)
    else:
        rest_grad_(z, lse_t.detach(), lse_1.detach(), g_t / t, g_1, t)
    z.scatter_(1, ids, g_top.to(z.dtype))
    z.scatter_add_(1, lab, g_label.unsqueeze(-1).to(z.dtype))
    if grad_w is not None:
        _mm_into_f32(grad_w, z.t(), h_c)
    if grad_h is not None:
        torch.mm(z, w, out=grad_h)
    return {k: v.detach() for k, v in out.items()}


class _FusedLinearTopkKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, spec: KDLossSpec, reduction: str,
                chunk_rows: int, compute_dtype: torch.dtype, need_h: bool, need_w: bool) -> tuple[torch.Tensor, ...]:
        n, v = hidden.shape[0], weight.shape[0]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        valid = (labels != IGNORE_INDEX).sum().item()  # one sync: a mean needs the count before the gradients
        scale = 1.0 / max(valid, 1) if reduction == "mean" else 1.0
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(v, weight.shape[1], device=weight.device, dtype=torch.float32) if need_w else None
        per_token = {k: torch.empty(n, device=hidden.device, dtype=torch.float32) for k in ("loss", "kd", "ce")}
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            z = h[r0:r1] @ w.t()
            out = _chunk_grads(z, h[r0:r1], w, labels[r0:r1], topk_ids[r0:r1], topk_logprobs[r0:r1],
                               tail_logmass[r0:r1], spec, scale, None if grad_h is None else grad_h[r0:r1], grad_w)
            for k in per_token:
                per_token[k][r0:r1] = out[k]
            del z
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if reduction == "none":
            ctx.mark_non_differentiable(per_token["loss"], per_token["kd"], per_token["ce"])
            return per_token["loss"], per_token["kd"], per_token["ce"]
        totals = [per_token[k].sum() * scale for k in ("loss", "kd", "ce")]
        ctx.mark_non_differentiable(totals[1], totals[2])
        return tuple(totals)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        # In place: these buffers are ours and used once, and a [V, H] float32 temporary is 1.2 GB at 152k x 2k.
        gh = None if grad_h is None else grad_h.mul_(grad_loss).to(ctx.dtypes[0])
        gw = None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def fused_linear_topk_kd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                         topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, spec: KDLossSpec,
                         reduction: str = "mean", chunk_rows: int | None = None,
                         compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """KD + CE against a top-k teacher, straight from the student's final hidden states.

    hidden [N, H] (post final norm), weight [V, H] (output layer; rows past the teacher's vocabulary must be
    sliced off by the caller), labels [N] (IGNORE_INDEX to skip), topk_ids [N, k] int64, topk_logprobs [N, k],
    tail_logmass [N]. Gradients are computed during the forward, for the inputs that require grad; under
    torch.no_grad() that work is skipped. compute_dtype: dtype of the GEMMs and of the logits chunk
    (default: the autocast dtype when autocast is on for hidden's device, else hidden's dtype).
    Returns `loss` (differentiable for reduction "mean"/"sum"), `kd`, `ce`; [N] each with reduction "none"
    (no gradient then).
    Same values as `kd_losses.topk_kd_loss(hidden @ weight.T, ...)`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    n = hidden.shape[0]
    if not (labels.shape == (n,) and topk_ids.shape[0] == n and topk_logprobs.shape == topk_ids.shape
            and tail_logmass.shape == (n,)):
        raise ValueError(f"per-token inputs must have N={n} rows: labels {tuple(labels.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)}, tail_logmass "
                         f"{tuple(tail_logmass.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if compute_dtype is None:
        dev = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    if chunk_rows is None:
        chunk_rows = max(16, DEFAULT_CHUNK_BYTES // (weight.shape[0] * torch.finfo(compute_dtype).bits // 8))
    grad_on = torch.is_grad_enabled() and reduction != "none"
    with torch.autocast(hidden.device.type, enabled=False):
        loss, kd, ce = _FusedLinearTopkKD.apply(hidden, weight, labels, topk_ids.long(), topk_logprobs,
                                                tail_logmass, spec, reduction, chunk_rows, compute_dtype,
                                                grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return {"loss": loss, "kd": kd, "ce": ce}
