"""Row statistics of a teacher's logits around its top-k, in one read: the log-normaliser and the logsumexp of
everything outside the top-k.

The logits stage keeps, per token, the k largest log-probabilities and the log of the mass outside them (the
tail). Taken naively that is a float32 copy of the [rows, V] logits, a logsumexp over it, a top-k, a second copy
with the top-k overwritten by -inf and a second logsumexp: about ten passes over 4-byte values, where the head's
matmul wrote 2-byte ones once. Here, given the k-th largest value of each row (from the top-k), one pass over the
logits in their own dtype gives

    lse[r]       = logsumexp(z[r, :])
    lse_below[r] = logsumexp(z[r, j] for z[r, j] < kth[r])
    n_eq[r]      = #{j : z[r, j] == kth[r]}

and the tail is lse_below joined with the values equal to the k-th that the top-k left out (ties), exactly:
everything above the k-th value is in the top-k, everything below it is not.

`block_stats` is the other reading of the same row, for a selection that never reads it whole twice: the maximum
and the logsumexp of each block of consecutive columns.

A Triton kernel on CUDA tensors; on CPU tensors plain PyTorch, or the kernel through the interpreter when
`TRITON_ON_CPU` is set (its test does; the pipeline's CPU runs keep the PyTorch path, which is faster there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# CPU tensors go through the interpreter only when asked (the kernel's test); see the module doc.
TRITON_ON_CPU: bool = False

_NEG_BIG = tl.constexpr(-1.0e30)  # a finite start for running maxima: exp(-inf - m) is then 0, not NaN


@triton.jit
def _row_stats_kernel(z_ptr, kth_ptr, lse_ptr, below_ptr, eq_ptr, V, stride_r, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = z_ptr + r * stride_r
    kth = tl.load(kth_ptr + r)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    mb = tl.full((), _NEG_BIG, tl.float32)
    sb = tl.zeros((), tl.float32)
    eq = tl.zeros((), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(row + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        zb = tl.where(z < kth, z, float("-inf"))
        mb_new = tl.maximum(mb, tl.max(zb, 0))
        sb = sb * tl.exp(mb - mb_new) + tl.sum(tl.exp(zb - mb_new), 0)
        mb = mb_new
        eq += tl.sum((z == kth).to(tl.int32), 0)
    tl.store(lse_ptr + r, m + tl.log(s))
    tl.store(below_ptr + r, mb + tl.log(sb))
    tl.store(eq_ptr + r, eq)


def row_stats(z: torch.Tensor, kth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [N, V] (any float dtype, last dim contiguous), kth [N] float32 -> (lse [N] float32, lse_below [N]
    float32, n_eq [N] int32): the logsumexp of each row, of its entries below kth[r] (-inf when there is none),
    and how many entries equal kth[r]. Values are compared and summed in float32 (exact for bf16/fp16 inputs)."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"row_stats wants a [N, V] tensor with a contiguous last dim, got {tuple(z.shape)}")
    kth = kth.to(torch.float32).contiguous()
    if not (z.is_cuda or TRITON_ON_CPU):
        zf = z.float()
        below = torch.where(zf < kth[:, None], zf, float("-inf"))
        return (torch.logsumexp(zf, -1), torch.logsumexp(below, -1),
                (zf == kth[:, None]).sum(-1, dtype=torch.int32))
    n, v = z.shape
    lse = torch.empty(n, device=z.device, dtype=torch.float32)
    below = torch.empty_like(lse)
    eq = torch.empty(n, device=z.device, dtype=torch.int32)
    if n:
        _row_stats_kernel[(n,)](z, kth, lse, below, eq, v, z.stride(0), BLOCK_V=4096, num_warps=8)
    return lse, below, eq


@triton.jit
def _block_stats_kernel(z_ptr, max_ptr, lse_ptr, V, NB, stride_r, BLOCKS: tl.constexpr, WIDTH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = b[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    z = tl.load(z_ptr + r * stride_r + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    m = tl.max(z, 1)
    ms = tl.maximum(m, _NEG_BIG)  # a block of -inf only: its sum is 0 and its logsumexp -inf, not NaN
    lse = ms + tl.log(tl.sum(tl.exp(z - ms[:, None]), 1))
    keep = b < NB
    tl.store(max_ptr + r * NB + b, m, mask=keep)
    tl.store(lse_ptr + r * NB + b, lse, mask=keep)


def block_stats(z: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, V] (any float dtype, last dim contiguous) -> (max [N, NB], logsumexp [N, NB]) float32 of each block
    of `width` consecutive columns (a power of two), NB = ceil(V / width), the last block holding what is left: one
    read of the logits gives the top-k's candidate blocks and every block's share of the normaliser
    (logit_cache.topk.topk_select)."""
    if z.dim() != 2 or z.stride(1) != 1 or width & (width - 1):
        raise ValueError(f"block_stats wants a [N, V] tensor with a contiguous last dim and a power-of-two width, "
                         f"got {tuple(z.shape)} and {width}")
    n, v = z.shape
    nb = -(-v // width)
    bmax = torch.empty(n, nb, device=z.device, dtype=torch.float32)
    blse = torch.empty_like(bmax)
    if n and nb:
        blocks = max(1, 4096 // width)
        _block_stats_kernel[(n, -(-nb // blocks))](z, bmax, blse, v, nb, z.stride(0), BLOCKS=blocks, WIDTH=width,
                                                   num_warps=8)
    return bmax, blse
