"""Row kernels of the fused distillation loss: per-row logsumexp, and the gradient written over the logits.

The fused loss (distill/fused_linear_kd.py) works on one chunk of student logits z [C, V] at a time, with
the teacher's top-k positions already overwritten by -inf. Everything the loss needs from the other V-k
logits is their logsumexp, at 1/T and at 1; everything the gradient needs there is

    dL/dz[r, j] = c_t[r] * exp(z[r, j] / T - lse_t[r]) + c_1[r] * exp(z[r, j] - lse_1[r])

with two scalars per row from the small top-k loss. So two passes over the chunk suffice: `row_lse` reads
it once; `rest_grad_` reads it again and writes the gradient in place, in the logits' dtype, so no second
[C, V] buffer exists. (-inf positions get 0; the caller scatters the exact top-k gradients afterwards.)

Both run as Triton kernels on CUDA tensors and under TRITON_INTERPRET=1, and as plain PyTorch otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.interpreter import INTERPRETED

# Start value of the running max: finite, so a tile that is all -inf gives exp(-inf - m) = 0, not NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_lse_kernel(z_ptr, lse_t_ptr, lse_1_ptr, V, stride_r, inv_t,
                    TWO: tl.constexpr, BLOCK_V: tl.constexpr):
    """lse_t[r] = logsumexp(z[r] * inv_t), lse_1[r] = logsumexp(z[r]) (only when TWO)."""
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * stride_r
    offs = tl.arange(0, BLOCK_V)
    m_t = tl.full((), _NEG_BIG, tl.float32)
    s_t = tl.zeros((), tl.float32)
    m_1 = tl.full((), _NEG_BIG, tl.float32)
    s_1 = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(row + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        a = z * inv_t
        m_new = tl.maximum(m_t, tl.max(a, 0))
        s_t = s_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(a - m_new), 0)
        m_t = m_new
        if TWO:
            m1_new = tl.maximum(m_1, tl.max(z, 0))
            s_1 = s_1 * tl.exp(m_1 - m1_new) + tl.sum(tl.exp(z - m1_new), 0)
            m_1 = m1_new
    tl.store(lse_t_ptr + r, m_t + tl.log(s_t))
    if TWO:
        tl.store(lse_1_ptr + r, m_1 + tl.log(s_1))


@triton.jit
def _rest_grad_kernel(z_ptr, lse_t_ptr, lse_1_ptr, c_t_ptr, c_1_ptr, V, stride_r, inv_t,
                      TWO: tl.constexpr, BLOCK_V: tl.constexpr):
    """z[r, j] <- c_t[r] exp(z[r, j] inv_t - lse_t[r]) (+ c_1[r] exp(z[r, j] - lse_1[r]) when TWO)."""
    r = tl.program_id(0).to(tl.int64)
    v0 = tl.program_id(1) * BLOCK_V
    offs = v0 + tl.arange(0, BLOCK_V)
    ok = offs < V
    ptr = z_ptr + r * stride_r + offs
    z = tl.load(ptr, mask=ok, other=float("-inf")).to(tl.float32)
    g = tl.load(c_t_ptr + r) * tl.exp(z * inv_t - tl.load(lse_t_ptr + r))
    if TWO:
        g += tl.load(c_1_ptr + r) * tl.exp(z - tl.load(lse_1_ptr + r))
    g = tl.where(z == float("-inf"), 0.0, g)  # also when the whole row is -inf (lse -inf, exp(nan))
    tl.store(ptr, g.to(z_ptr.dtype.element_ty), mask=ok)


# CPU tensors go through the Triton interpreter only when it is on; tests that are about something else
# (the trainer) may switch this off for speed, the kernel tests keep it.
TRITON_ON_CPU: bool = INTERPRETED


def _use_triton(z: torch.Tensor) -> bool:
    return z.is_cuda or TRITON_ON_CPU


def row_lse(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logsumexp of z / T and of z, in float32.

    z [C, V] (bf16, fp16 or fp32, last dim contiguous; -inf entries allowed) -> (lse_t [C], lse_1 [C]).
    At T = 1 both are the same tensor. A row that is all -inf gives -inf.
    """
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"row_lse wants a [C, V] tensor with a contiguous last dim, got {tuple(z.shape)}")
    two = temperature != 1.0
    if not _use_triton(z):
        zf = z.float()
        lse_t = torch.logsumexp(zf / temperature, -1)
        return lse_t, (torch.logsumexp(zf, -1) if two else lse_t)
    c, v = z.shape
    lse_t = torch.empty(c, device=z.device, dtype=torch.float32)
    lse_1 = torch.empty_like(lse_t) if two else lse_t
    if c:
        _row_lse_kernel[(c,)](z, lse_t, lse_1, v, z.stride(0), 1.0 / temperature, TWO=two, BLOCK_V=4096,
                              num_warps=8)
    return lse_t, lse_1


def rest_grad_(z: torch.Tensor, lse_t: torch.Tensor, lse_1: torch.Tensor, c_t: torch.Tensor, c_1: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Overwrite z with c_t exp(z/T - lse_t) + c_1 exp(z - lse_1), row-wise; returns z.

    z [C, V]; lse_t, lse_1, c_t, c_1 [C] float32. At T = 1 pass the combined coefficient in c_t and zeros
    (or anything) in c_1: the second term is skipped.
    """
    two = temperature != 1.0
    if not _use_triton(z):
        zf = z.float()
        g = c_t[:, None] * torch.exp(zf / temperature - lse_t[:, None])
        if two:
            g += c_1[:, None] * torch.exp(zf - lse_1[:, None])
        return z.copy_(torch.where(zf == float("-inf"), 0.0, g))
    c, v = z.shape
    block = 2048
    if c:
        _rest_grad_kernel[(c, triton.cdiv(v, block))](z, lse_t, lse_1, c_t.contiguous(), c_1.contiguous(), v,
                                                      z.stride(0), 1.0 / temperature, TWO=two, BLOCK_V=block,
                                                      num_warps=4)
    return z
