"""Grouped GEMMs of the MoE experts over expert-sorted slots (see `moe_align`), with fused epilogues.

- gate/up: gathers each slot's token row straight from `hidden` (no permuted copy), multiplies by the expert's
  gate and up matrices in one pass over K with two accumulators, applies the gated activation in registers and
  writes only the [slots, I] activation, never the [slots, 2I] pre-activation.
- down: multiplies the activation by the expert's down matrix, scales each row by its routing weight and adds
  it into the token's output row (float32 atomics), so the sum over k needs no [T, k, H] buffer or reduction.

Weights are addressed through strides, so transformers' [E, out, in] layout, the transposed [E, in, out] one
and the interleaved gate/up layout all run without a copy.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_SILU, ACT_GELU_TANH, ACT_GELU, ACT_RELU = 0, 1, 2, 3
ACTIVATIONS = {"silu": ACT_SILU, "swish": ACT_SILU, "gelu_pytorch_tanh": ACT_GELU_TANH, "gelu_new": ACT_GELU_TANH,
               "gelu": ACT_GELU, "relu": ACT_RELU}


@triton.jit
def gated_act(g, u, ACT: tl.constexpr):
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        # tanh-approximated GELU, tanh written through exp (no tl.tanh in every Triton version).
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g * (1.0 - 1.0 / (tl.exp(2.0 * inner) + 1.0))
    elif ACT == 2:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        a = tl.maximum(g, 0.0)
    return a * u


@triton.jit
def tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M consecutive row tiles share each column tile, so the expert's weight tile is
    # read from L2 rather than HBM by the programs running at the same time.
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def tile_rows(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # A tile's expert, its sorted rows and their slot ids (padding rows invalid), and its output columns.
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ptr + offs_m)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, offs_m, slots, slots < num_slots, offs_n, offs_n < N


@triton.jit
def store_gated(out_ptr, acc_g, acc_u, offs_m, offs_n, valid, n_ok, stride_ot, ACT: tl.constexpr):
    # Gate/up epilogue: the gated activation in registers, one [BLOCK_M, BLOCK_N] store in the output's dtype.
    h = gated_act(acc_g, acc_u, ACT)
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def store_down(out_ptr, acc, topw_ptr, slots, valid, offs_n, n_ok, stride_ot, TOP_K: tl.constexpr,
               PER_SLOT: tl.constexpr):
    # Down epilogue: scale each row by its routing weight, then store it at its slot (PER_SLOT), store it at its
    # token (k = 1), or add it into its token's float32 row (atomics).
    weight = tl.load(topw_ptr + slots, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    mask = valid[:, None] & n_ok[None, :]
    if PER_SLOT:
        tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_ot + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        o_ptrs = out_ptr + (slots // TOP_K).to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
        if TOP_K == 1:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(o_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, P, K, N,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    gate_off, up_off, row_mult,
    TOP_K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    """out[row, n] = act(x[tok] . Wg[e, n]) * (x[tok] . Wu[e, n]) for each padded sorted row (N = I)."""
    num_pid_m = P // BLOCK_M
    pid_m, pid_n = tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e, offs_m, slots, valid, offs_n, n_ok = tile_rows(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N,
                                                       BLOCK_M, BLOCK_N)
    tok = (slots // TOP_K).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    w_base = w_ptr + e * stride_we + offs_k[:, None] * stride_wk
    g_ptrs = w_base + (offs_n * row_mult + gate_off)[None, :] * stride_wn
    u_ptrs = w_base + (offs_n * row_mult + up_off)[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_F32:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    store_gated(out_ptr, acc_g, acc_u, offs_m, offs_n, valid, n_ok, stride_ot, ACT)


@triton.jit
def down_kernel(
    a_ptr, w_ptr, out_ptr, topw_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, P, K, N,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PER_SLOT: tl.constexpr,
):
    """out[tok, n] += w_slot * (a[row] . Wd[e, n]) for each padded sorted row (K = I, N = H); out is float32.

    PER_SLOT: instead, store each weighted row at out[slot] ([T*k, H], the model's dtype) for a later sum over
    k. Plain stores instead of T*k*H float32 atomics: cheaper where the atomics saturate L2 (large T*k)."""
    num_pid_m = P // BLOCK_M
    pid_m, pid_n = tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e, offs_m, slots, valid, offs_n, n_ok = tile_rows(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N,
                                                       BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_at + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    store_down(out_ptr, acc, topw_ptr, slots, valid, offs_n, n_ok, stride_ot, TOP_K, PER_SLOT)
