"""Grouped GEMMs of the MoE experts over expert-sorted slots (see `moe_align`), with fused epilogues.

- gate/up: gathers each slot's token row straight from `hidden` (no permuted copy), multiplies by the expert's
  gate and up matrices in one pass over K with two accumulators, adds the expert's gate/up bias if it has one,
  applies the gated activation in registers and writes only the [slots, I] activation, never the [slots, 2I]
  pre-activation.
- down: multiplies the activation by the expert's down matrix, adds the expert's down bias if it has one, scales
  each row by its routing weight and adds it into the token's output row (float32 atomics), so the sum over k
  needs no [T, k, H] buffer or reduction.

Weights are addressed through strides, so transformers' [E, out, in] layout, the transposed [E, in, out] one
and the interleaved gate/up layout all run without a copy. Biases (GPT-OSS) are optional operands behind a
`HAS_BIAS` constexpr: kernels launched without them compile to the same code as before they existed.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_SILU, ACT_GELU_TANH, ACT_GELU, ACT_RELU = 0, 1, 2, 3
ACTIVATIONS = {"silu": ACT_SILU, "swish": ACT_SILU, "gelu_pytorch_tanh": ACT_GELU_TANH, "gelu_new": ACT_GELU_TANH,
               "gelu": ACT_GELU, "relu": ACT_RELU}
# GPT-OSS's gate: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit). Deliberately not in
# ACTIVATIONS, which maps a config's `hidden_act` (GPT-OSS's config says "silu", which its experts ignore): a model
# reaches this one only through hf_moe's registry of known `_apply_gate` functions, never by its `hidden_act`.
ACT_CLAMPED_SWIGLU = 4
CLAMPED_SWIGLU = "clamped_swiglu"
# Every gate the kernels compute, by the name `fused_experts(activation=...)` takes.
KERNEL_ACTIVATIONS = {**ACTIVATIONS, CLAMPED_SWIGLU: ACT_CLAMPED_SWIGLU}


@triton.jit
def gated_act(g, u, ACT: tl.constexpr, alpha=None, limit=None):
    """act(g) * u on float32 [.., N] accumulators. alpha, limit (runtime floats): the clamped SwiGLU's sigmoid gain
    and clamp; the other activations ignore them. Their None defaults serve callers that never pass
    ACT_CLAMPED_SWIGLU (the descriptor kernels): that activation refuses to compile without them."""
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        # tanh-approximated GELU, tanh written through exp (no tl.tanh in every Triton version).
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g * (1.0 - 1.0 / (tl.exp(2.0 * inner) + 1.0))
    elif ACT == 2:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 3:
        a = tl.maximum(g, 0.0)
    else:
        tl.static_assert(ACT == 4, "unknown activation code")
        tl.static_assert(limit is not None, "clamped_swiglu needs alpha and limit")
        # GPT-OSS clamps the gate from above only, the up projection on both sides, and adds 1 to up.
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit) + 1.0
        a = g * tl.sigmoid(alpha * g)
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
def bias_cols(bias_ptr, e, stride_be, stride_bn, cols, n_ok):
    # Expert e's bias at columns `cols` ([BLOCK_N], float32; 0 where masked), for the epilogues to add.
    b = tl.load(bias_ptr + e * stride_be + cols.to(tl.int64) * stride_bn, mask=n_ok, other=0.0)
    return b.to(tl.float32)


@triton.jit
def store_gated(out_ptr, acc_g, acc_u, offs_m, offs_n, valid, n_ok, stride_ot, ACT: tl.constexpr, alpha=None,
                limit=None):
    # Gate/up epilogue: the gated activation in registers, one [BLOCK_M, BLOCK_N] store in the output's dtype.
    # alpha, limit: the clamped SwiGLU's (see gated_act); the descriptor kernels, which never run it, leave them out.
    h = gated_act(acc_g, acc_u, ACT, alpha, limit)
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def store_down(out_ptr, acc, topw_ptr, slots, valid, offs_n, n_ok, stride_ot, TOP_K: tl.constexpr,
               PER_SLOT: tl.constexpr):
    # Down epilogue: scale each row (the expert's output, its down bias already in acc) by its routing weight, then
    # store it at its slot (PER_SLOT), store it at its token (k = 1), or add it into its token's float32 row
    # (atomics).
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
    bias_ptr, stride_be, stride_bn, alpha, limit,
    TOP_K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PAIRED: tl.constexpr = False,
):
    """out[row, n] = act(x[tok] . Wg[e, n] + bg[e, n]) * (x[tok] . Wu[e, n] + bu[e, n]) for each padded sorted row
    (N = I). Gate/up row n of expert e is weight row n * row_mult + gate_off / up_off (concatenated: row_mult 1,
    up_off I; interleaved: 2, 1), and so is its bias column in bias [E, 2I] (HAS_BIAS; else the bias terms are 0
    and bias_ptr is unused). alpha, limit: ACT_CLAMPED_SWIGLU's parameters, ignored by the other activations.

    PAIRED: the interleaved layout with gate/up rows adjacent in memory (GPT-OSS's transposed [E, H, 2I]: stride_wn
    1, row_mult 2, gate_off 0, up_off 1). Each K step then loads one contiguous [BLOCK_K, 2 BLOCK_N] tile of
    gate/up pairs and splits it in registers: two loads of stride 2 do not vectorise (Triton specialises a stride of
    1, not 2), and the same change made the expert-rows kernels 6x faster on that layout (kernels/NOTES.md)."""
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
    cols2 = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # PAIRED: the tile's gate/up pairs, contiguous
    n2_ok = cols2 < 2 * N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        if PAIRED:
            if EVEN_K:
                w2 = tl.load(w_base + cols2[None, :], mask=n2_ok[None, :], other=0.0)
            else:
                w2 = tl.load(w_base + cols2[None, :], mask=n2_ok[None, :] & k_ok[:, None], other=0.0)
            bg, bu = tl.split(tl.reshape(w2, (BLOCK_K, BLOCK_N, 2)))
        elif EVEN_K:
            bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            bg = tl.load(g_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_F32:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
        w_base += BLOCK_K * stride_wk
    if HAS_BIAS:  # before the activation, as the model adds it to the projection's output
        acc_g += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + gate_off, n_ok)[None, :]
        acc_u += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + up_off, n_ok)[None, :]
    store_gated(out_ptr, acc_g, acc_u, offs_m, offs_n, valid, n_ok, stride_ot, ACT, alpha, limit)


@triton.jit
def down_kernel(
    a_ptr, w_ptr, out_ptr, topw_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, P, K, N,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    bias_ptr, stride_be, stride_bn,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PER_SLOT: tl.constexpr,
):
    """out[tok, n] += w_slot * (a[row] . Wd[e, n] + bd[e, n]) for each padded sorted row (K = I, N = H); out is
    float32. bd: the down bias [E, H] (HAS_BIAS; else 0 and bias_ptr unused), inside the routing weight as the
    model adds it.

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
    if HAS_BIAS:  # each expert's output carries its bias before store_down scales it by the routing weight
        acc += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n, n_ok)[None, :]
    store_down(out_ptr, acc, topw_ptr, slots, valid, offs_n, n_ok, stride_ot, TOP_K, PER_SLOT)
