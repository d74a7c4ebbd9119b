"""The decode path of the MoE experts: a handful of tokens, where the work is reading expert weights once and
the cost is launches, not arithmetic.

No alignment, no padding, no atomics: two launches after the router.
- gate/up: one program per (slot, column tile) computes act(x.Wg + bg) * (x.Wu + bu) as a matrix-vector product
  (the biases, GPT-OSS's, only where the experts have them: `HAS_BIAS`);
- down: one program per (token, column tile) loops over the token's k slots, so the sum over k stays in
  registers and the output is written once, in the model's dtype; each slot's down bias joins its product
  before the routing weight.
Tensor cores need 16 rows; a decode step has one, so this uses plain FMA over 16-byte vector loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.moe_grouped_gemm import bias_cols, gated_act


@triton.jit
def gate_up_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, K, N,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    gate_off, up_off, row_mult,
    bias_ptr, stride_be, stride_bn, alpha, limit,
    TOP_K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[slot, n] = act(x[slot // k] . Wg[e, n] + bg[e, n]) * (x[slot // k] . Wu[e, n] + bu[e, n]), e = ids[slot].

    Gate/up row n is weight row n * row_mult + gate_off / up_off, and bias column the same in bias [E, 2I]
    (HAS_BIAS; else the bias terms are 0). alpha, limit: ACT_CLAMPED_SWIGLU's, ignored by the other activations."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    tok = slot // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e * stride_we
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + tok * stride_xt + k, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + (offs_n * row_mult + gate_off)[:, None] * stride_wn + k[None, :] * stride_wk, mask=m,
                     other=0.0)
        wu = tl.load(w_base + (offs_n * row_mult + up_off)[:, None] * stride_wn + k[None, :] * stride_wk, mask=m,
                     other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        acc_u += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:  # before the activation, as the model adds it to the projection's output
        acc_g += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + gate_off, n_ok)
        acc_u += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + up_off, n_ok)
    h = gated_act(acc_g, acc_u, ACT, alpha, limit)
    tl.store(out_ptr + slot * stride_ot + offs_n, h.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def down_gemv_kernel(
    a_ptr, w_ptr, ids_ptr, topw_ptr, out_ptr, K, N,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    bias_ptr, stride_be, stride_bn,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[t, n] = sum_j topw[t, j] * (a[t*k + j] . Wd[ids[t, j], n] + bd[ids[t, j], n]); bd: the down bias [E, H]
    (HAS_BIAS; else 0)."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(TOP_K):
        slot = t * TOP_K + j
        e = tl.load(ids_ptr + slot).to(tl.int64)
        w_base = w_ptr + e * stride_we
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            a = tl.load(a_ptr + slot * stride_at + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_base + offs_n[:, None] * stride_wn + k[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        if HAS_BIAS:  # inside the routing weight: the model weights each expert's biased output
            acc += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n, n_ok)
        total += tl.load(topw_ptr + slot).to(tl.float32) * acc
    tl.store(out_ptr + t * stride_ot + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
