"""The rotary position embedding (rotate-half convention) in one pass over the queries or keys.

transformers computes `q * cos + rotate_half(q) * sin` as five kernels per tensor (a negation, a concatenation,
two products, a sum), each writing a full [batch, heads, seq, head_dim] tensor: on a Qwen3-30B-A3B teacher at
32k tokens per forward about 90 ms of a 630 ms decoder (bench/results/teacher_scale_profile_h200.log). Here one
program takes one token position of every head: it reads the position's cos and sin row once and each head's row
once, and writes the result once, in float32 arithmetic rounded once.

With R = cos.shape[-1] (the rotary width, R <= head_dim D, R even), for d < R/2:

    out[d]       = x[d] * cos[d] - x[d + R/2] * sin[d]
    out[d + R/2] = x[d + R/2] * cos[d + R/2] + x[d] * sin[d + R/2]

and dims R .. D-1 pass through unchanged (the partial rotary of GLM, Phi-3, StableLM). GPT-OSS passes cos and
sin of width D/2 and uses them for both halves (`shared_halves`: R = 2 x their width, cos[d + R/2] = cos[d]).
Which models compute exactly this is decided against their own function (kernels/hf_rotary.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import fast

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 1024


@triton.jit
def _rotate_heads(x_ptr, y_ptr, b, s, H, D, R, sxb, sxh, sxs, syb, syh, sys, c1, c2, s1, s2,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr):
    half = R // 2
    d = tl.arange(0, HALF)
    dm = d < half
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
        keep = (h[:, None] < H) & dm[None, :]
        xrow = x_ptr + b * sxb + s * sxs + h[:, None] * sxh
        yrow = y_ptr + b * syb + s * sys + h[:, None] * syh
        x1 = tl.load(xrow + d[None, :], mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + half + d[None, :], mask=keep, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(yrow + d[None, :], y1.to(y_ptr.dtype.element_ty), mask=keep)
        tl.store(yrow + half + d[None, :], y2.to(y_ptr.dtype.element_ty), mask=keep)
        if REST > 0:  # the dims past the rotary width, copied
            e = R + tl.arange(0, REST)
            ke = (h[:, None] < H) & (e[None, :] < D)
            v = tl.load(xrow + e[None, :], mask=ke, other=0.0)
            tl.store(yrow + e[None, :], v.to(y_ptr.dtype.element_ty), mask=ke)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, HQ, HK, D, R,
                   sqb, sqh, sqs, skb, skh, sks, scb, scs, sob, soh, sos, spb, sph, sps,
                   SHARED: tl.constexpr, HAS_K: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
                   REST: tl.constexpr):
    # One token position: its cos/sin row read once, then every head of q (and of k, when given).
    pos = tl.program_id(0)
    b = (pos // S).to(tl.int64)
    s = (pos % S).to(tl.int64)
    half = R // 2
    d = tl.arange(0, HALF)
    dm = d < half
    c1 = tl.load(cos_ptr + b * scb + s * scs + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * scb + s * scs + d, mask=dm, other=0.0).to(tl.float32)
    if SHARED:
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(cos_ptr + b * scb + s * scs + half + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + b * scb + s * scs + half + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, b, s, HQ, D, R, sqb, sqh, sqs, sob, soh, sos, c1, c2, s1, s2, BLOCK_H, HALF, REST)
    if HAS_K:
        _rotate_heads(k_ptr, ko_ptr, b, s, HK, D, R, skb, skh, sks, spb, sph, sps, c1, c2, s1, s2, BLOCK_H, HALF,
                      REST)


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared_halves: bool = False) -> bool:
    """Whether rotary takes x [B, H, S, D] with cos, sin [B or 1, S, R] (R even, R <= D, last dims stride 1; with
    `shared_halves` cos and sin are [B or 1, S, R/2])."""
    if x.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or sin.stride() != cos.stride():
        return False
    b, _, s, d = x.shape
    r = cos.shape[-1] * (2 if shared_halves else 1)
    return (x.dtype in _DTYPES and cos.dtype in _DTYPES and sin.dtype == cos.dtype and cos.shape[0] in (1, b)
            and cos.shape[1] == s and 0 < r <= d <= MAX_HEAD_DIM and r % 2 == 0 and x.stride(-1) == 1
            and cos.stride(-1) == 1 and x.device == cos.device == sin.device)


def _out_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty_like(x, dtype=dtype)  # same strides as x wherever x is dense (the [B, S, H, D] memory of HF)
    return y if y.stride(-1) == 1 else torch.empty(x.shape, dtype=dtype, device=x.device)


def rotary_pair(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                shared_halves: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, Hq, S, D] and k [B, Hk, S, D] (or None) rotated by one launch: each program reads a position's cos
    and sin once for the heads of both. Any strides with a contiguous last dim; cos/sin [B or 1, S, R] ([B or 1,
    S, R/2] with `shared_halves`). Returns tensors with their inputs' strides, in the promoted dtype of the input
    and cos (as transformers' products give). Raises ValueError for inputs `supports` refuses."""
    for x in (q, k):
        if x is not None and not supports(x, cos, sin, shared_halves):
            raise ValueError(f"rotary takes x [B, H, S, D] and cos/sin [B or 1, S, R] (R even, R <= D <= "
                             f"{MAX_HEAD_DIM}, last dims contiguous); got {tuple(x.shape)} and {tuple(cos.shape)}")
    if k is not None and (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        return rotary_pair(q, None, cos, sin, shared_halves)[0], rotary_pair(k, None, cos, sin, shared_halves)[0]
    b, hq, s, d = q.shape
    r = cos.shape[-1] * (2 if shared_halves else 1)
    qo = _out_like(q, torch.promote_types(q.dtype, cos.dtype))
    ko = _out_like(k, torch.promote_types(k.dtype, cos.dtype)) if k is not None else None
    if b * s == 0:
        return qo, ko
    kk, kout = (k, ko) if k is not None else (q, qo)  # unused when HAS_K is off
    hk = kk.shape[1]
    half = triton.next_power_of_2(r // 2)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), 4096 // (2 * half)))
    rest = triton.next_power_of_2(d - r) if d > r else 0
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    fast(_rotary_kernel)[(b * s,)](
        q, kk, cos, sin, qo, kout, s, hq, hk, d, r, q.stride(0), q.stride(1), q.stride(2), kk.stride(0),
        kk.stride(1), kk.stride(2), cb, cos.stride(1), qo.stride(0), qo.stride(1), qo.stride(2), kout.stride(0),
        kout.stride(1), kout.stride(2), SHARED=shared_halves, HAS_K=k is not None, BLOCK_H=block_h, HALF=half,
        REST=rest, num_warps=4)
    return qo, ko


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared_halves: bool = False) -> torch.Tensor:
    """One tensor x [B, H, S, D] through `rotary_pair` -> [B, H, S, D] with x's strides."""
    return rotary_pair(x, None, cos, sin, shared_halves)[0]


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared_halves: bool = False
                     ) -> torch.Tensor:
    """The rotate-half embedding in PyTorch with the partial-width pass-through (the kernel's test compares)."""
    if shared_halves:
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    r = cos.shape[-1]
    c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat((-rot[..., r // 2:], rot[..., :r // 2]), dim=-1)
    return torch.cat((rot * c + half * s_, rest.to(torch.promote_types(x.dtype, cos.dtype))), dim=-1)
