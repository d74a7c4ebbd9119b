"""RMSNorm in one pass: read each row once, write it once.

transformers' RMSNorm is about eight kernels per call (a float32 copy, pow, mean, add, rsqrt, multiply, the cast
back, the weight): on a full-depth Qwen3-30B-A3B teacher at 32k tokens per forward those, with the rotary
embedding's, took about a third of the decoder's GPU time (bench/results/teacher_scale_profile_h200.log), more
than the attention and the cuBLAS projections together. Four norms per layer (input, post-attention, and
Qwen3's per-head q and k norms) each read and write a few bytes per element; here that is the whole cost.

The families differ in where the weight comes in and in what dtype (`MODES`); which one a model's module is, is
decided by comparing against its own forward (kernels/hf_norms.py), not assumed from its class name:
- `CAST_THEN_SCALE` (Llama, Mistral, Qwen, Mixtral, OLMoE, DeepSeek): w * (x * r).to(input dtype), the product
  in the promoted dtype of the weight and the input;
- `SCALE_THEN_CAST` (OLMo2, Cohere-style): (x * r * w).to(input dtype), the product in float32;
- `ONE_PLUS_WEIGHT` (Gemma): (x * r * (1 + w)).to(input dtype), float32.
Here r = rsqrt(mean(x^2) + eps), always in float32, as every family computes it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import fast

CAST_THEN_SCALE, SCALE_THEN_CAST, ONE_PLUS_WEIGHT = 0, 1, 2
MODES = (CAST_THEN_SCALE, SCALE_THEN_CAST, ONE_PLUS_WEIGHT)
MAX_WIDTH = 1 << 15  # one row in registers; wider rows keep the module's own forward
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, M, N, stride_x, eps, MODE: tl.constexpr, IN_DT: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    keep = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    t = x * r[:, None]
    if MODE == 0:
        # The normalised row is rounded to the input's dtype before the weight, as those models do.
        y = t.to(IN_DT).to(tl.float32) * w[None, :]
    elif MODE == 1:
        y = t * w[None, :]
    else:
        y = t * (1.0 + w[None, :])
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=keep)


def out_dtype(mode: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The output dtype each family's forward returns."""
    return torch.promote_types(w_dtype, x_dtype) if mode == CAST_THEN_SCALE else x_dtype


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm takes x [..., N] with this weight [N] (dtypes, width, a last dim of stride 1)."""
    return (x.dtype in _TL_DTYPES and weight.dtype in _TL_DTYPES and weight.dim() == 1 and x.dim() >= 1
            and x.shape[-1] == weight.shape[0] and 0 < x.shape[-1] <= MAX_WIDTH and x.device == weight.device
            and (x.shape[-1] == 1 or x.stride(-1) == 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int = CAST_THEN_SCALE) -> torch.Tensor:
    """x [..., N] (float32, bf16 or fp16), weight [N] -> y [..., N] contiguous, in `out_dtype(mode, ...)`.

    One program normalises ROWS rows (about 4K elements at once); the sum of squares and every product in
    float32. Raises ValueError for an input `supports` refuses."""
    if not supports(x, weight):
        raise ValueError(f"rms_norm takes x [..., N] (N <= {MAX_WIDTH}, last dim contiguous) in float32/bf16/fp16 "
                         f"and a weight [N]; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)}")
    if mode not in MODES:
        raise ValueError(f"rms_norm mode {mode} is not one of {MODES}")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)  # a view wherever the rows have one stride, else a contiguous copy (last dim stride 1)
    y = torch.empty(x.shape, dtype=out_dtype(mode, x.dtype, weight.dtype), device=x.device)
    m = x2.shape[0]
    if m == 0:
        return y
    block = triton.next_power_of_2(n)
    rows = max(1, min(64, 4096 // block))
    warps = 4 if block * rows <= 4096 else 8
    fast(_rms_norm_kernel)[(triton.cdiv(m, rows),)](
        x2, weight, y, m, n, x2.stride(0), float(eps), MODE=mode, IN_DT=_TL_DTYPES[x.dtype], ROWS=rows,
        BLOCK_N=block, num_warps=warps)
    return y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int = CAST_THEN_SCALE
                       ) -> torch.Tensor:
    """What each family's forward computes, in PyTorch (the kernel's test compares against it)."""
    t = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if mode == CAST_THEN_SCALE:
        return weight * t.to(x.dtype)
    if mode == SCALE_THEN_CAST:
        return (t * weight.float()).to(x.dtype)
    return (t * (1.0 + weight.float())).to(x.dtype)
