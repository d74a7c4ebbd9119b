"""The decode path of the MoE experts: a handful of tokens (1-4; from 5 to 16 see moe_expert_rows), where the work
is reading expert weights once and the cost is launches, not arithmetic.

No alignment, no padding, no atomics: two or three launches after the router.
- gate/up: one program per (slot, column tile) computes act(x.Wg + bg) * (x.Wu + bu) as a matrix-vector product
  (the biases, GPT-OSS's, only where the experts have them: `HAS_BIAS`);
- down: one program per (token, slot group, column tile) adds its group's weighted products (each slot's down
  bias joins its product before the routing weight); with one group per token (GROUPS == 1) the sum is written
  once in the model's dtype, else each group writes float32 partial sums and slot_sum_kernel adds them in slot
  order (the default: a group per slot, moe_experts.down_groups). Folding that sum into the down kernel (the last
  program of a column tile adding it) measured no faster (kernels/NOTES.md).
Shared experts (DeepSeek's, Qwen2-MoE's) ride along as N_SHARED more slots per token: the shared MLP's width cut
into chunks of the routed width (the last one masked), each chunk a slot with routing weight 1, read from the
shared weights' own tensors. A gated shared expert (Qwen2-MoE: sigmoid(x . w) times its output) has its gate dot
accumulated beside the gate/up products of each chunk, where x is already in registers, and scales the chunk's
activation (down is linear, so that is the gated output). So the shared expert costs no launch of its own and
its weights stream with the routed ones.
At 2-4 tokens each token's chunks read the shared weights again. A variant whose chunk programs served every
token at once (weights read once; commit 3cc3c9a) measured slower at 4 tokens on small layers (one H200, graph
replays: Qwen2-MoE 149 against 135 us, a 256-expert 3072-wide layer 130 against 94) and 2% faster on DeepSeek-V3:
fewer, longer programs on the critical path. Where the shared expert inside ours loses to the stock block, the
dispatcher runs the stock block (kernels/hf_shared.py).
Tensor cores need 16 rows; a decode step has one, so this uses plain FMA over 16-byte vector loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.moe_grouped_gemm import bias_cols, gated_act


@triton.jit
def _dots(x_row, g_base, u_base, row_stride, stride_k, offs_n, n_ok, K, sg_ptr, stride_sgk,
          WITH_SGATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Float32 products of x [K] with the gate and up rows offs_n (row r at base + r * row_stride, element k at
    # + k * stride_k), and with the shared-expert gate vector (WITH_SGATE; else a zero). Each call site keeps its
    # own specialised strides, so contiguous rows still load 16 bytes at a time.
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    rows = offs_n[:, None] * row_stride
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(g_base + rows + k[None, :] * stride_k, mask=m, other=0.0)
        wu = tl.load(u_base + rows + k[None, :] * stride_k, mask=m, other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        acc_u += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
        if WITH_SGATE:
            acc_s += tl.load(sg_ptr + k * stride_sgk, mask=k_ok, other=0.0).to(tl.float32) * x
    return acc_g, acc_u, tl.sum(acc_s, axis=0)


@triton.jit
def gate_up_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, K, N,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    gate_off, up_off, row_mult,
    bias_ptr, stride_be, stride_bn, alpha, limit,
    sh_gate_ptr, sh_up_ptr, stride_shn, stride_shk, sh_width, sgate_ptr, stride_sgk,
    TOP_K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_SHARED: tl.constexpr = 0, HAS_SGATE: tl.constexpr = False,
):
    """out[slot, n] = act(x[t] . Wg[e, n] + bg[e, n]) * (x[t] . Wu[e, n] + bu[e, n]) for slot = t * (TOP_K +
    N_SHARED) + j, j < TOP_K, e = ids[t, j]; for j = TOP_K + c (the shared expert's chunk c), the same with rows
    c * N + n of the shared gate / up weights [sh_width, K] (zero past sh_width), times sigmoid(x[t] . sgate)
    (HAS_SGATE: the shared expert's gate vector [K]).

    Gate/up row n of a routed expert is weight row n * row_mult + gate_off / up_off, and bias column the same in
    bias [E, 2I] (HAS_BIAS; else the bias terms are 0). alpha, limit: ACT_CLAMPED_SWIGLU's, ignored by the other
    activations."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    SLOTS: tl.constexpr = TOP_K + N_SHARED
    tok = slot // SLOTS
    j = slot % SLOTS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    x_row = x_ptr + tok * stride_xt
    if N_SHARED == 0:
        h = _routed_gate_up(x_row, w_ptr, ids_ptr, tok * TOP_K + j, K, stride_we, stride_wn, stride_wk, gate_off,
                            up_off, row_mult, bias_ptr, stride_be, stride_bn, alpha, limit, offs_n, n_ok,
                            ACT, HAS_BIAS, BLOCK_N, BLOCK_K)
    elif j < TOP_K:
        h = _routed_gate_up(x_row, w_ptr, ids_ptr, tok * TOP_K + j, K, stride_we, stride_wn, stride_wk, gate_off,
                            up_off, row_mult, bias_ptr, stride_be, stride_bn, alpha, limit, offs_n, n_ok,
                            ACT, HAS_BIAS, BLOCK_N, BLOCK_K)
    else:
        first = (j - TOP_K).to(tl.int64) * N  # the chunk's first row of the shared weights
        ok = n_ok & (first + offs_n < sh_width)
        g, u, s = _dots(x_row, sh_gate_ptr + first * stride_shn, sh_up_ptr + first * stride_shn, stride_shn,
                        stride_shk, offs_n, ok, K, sgate_ptr, stride_sgk, HAS_SGATE, BLOCK_N, BLOCK_K)
        h = gated_act(g, u, ACT, alpha, limit)  # 0 on masked columns: act(0) * 0
        if HAS_SGATE:
            h = h * tl.sigmoid(s)
    tl.store(out_ptr + slot * stride_ot + offs_n, h.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _routed_gate_up(x_row, w_ptr, ids_ptr, r, K, stride_we, stride_wn, stride_wk, gate_off, up_off, row_mult,
                    bias_ptr, stride_be, stride_bn, alpha, limit, offs_n, n_ok,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One routed slot (r: its index in ids [T, k]): the activation of its expert's gate/up rows offs_n.
    e = tl.load(ids_ptr + r).to(tl.int64)
    w_base = w_ptr + e * stride_we
    g, u, _ = _dots(x_row, w_base + gate_off * stride_wn, w_base + up_off * stride_wn, row_mult * stride_wn,
                    stride_wk, offs_n, n_ok, K, w_ptr, 0, False, BLOCK_N, BLOCK_K)
    if HAS_BIAS:  # before the activation, as the model adds it to the projection's output
        g += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + gate_off, n_ok)
        u += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + up_off, n_ok)
    return gated_act(g, u, ACT, alpha, limit)


@triton.jit
def _row_dot(a_row, w_base, stride_wn, stride_wk, offs_n, n_ok, K, k_end, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    # sum_k a[k] W[n, k] over k < min(K, k_end), float32 [BLOCK_N].
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = (k < K) & (k < k_end)
        a = tl.load(a_row + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_base + offs_n[:, None] * stride_wn + k[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    return acc


@triton.jit
def down_gemv_kernel(
    a_ptr, w_ptr, ids_ptr, topw_ptr, out_ptr, K, N,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    bias_ptr, stride_be, stride_bn,
    sh_down_ptr, stride_shn, stride_shk, sh_width,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_SHARED: tl.constexpr = 0, GROUPS: tl.constexpr = 1,
):
    """out[t, n] = sum_j topw[t, j] * (a[t*S + j] . Wd[ids[t, j], n] + bd[ids[t, j], n])
    + sum_c a[t*S + TOP_K + c] . Wsd[n, c*K : (c+1)*K], S = TOP_K + N_SHARED; bd: the down bias [E, H] (HAS_BIAS;
    else 0); Wsd: the shared expert's down weight [N, sh_width] (columns past sh_width are 0).

    GROUPS > 1: program (t * GROUPS + g, n tile) sums only slots [g * P, (g + 1) * P), P = cdiv(S, GROUPS), and
    writes that float32 partial sum to out [T, GROUPS, N] (slot_sum_kernel adds the groups); GROUPS == 1 writes the
    whole sum in out's dtype to out [T, N]."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = pid // GROUPS
    g = pid % GROUPS
    SLOTS: tl.constexpr = TOP_K + N_SHARED
    PER: tl.constexpr = (SLOTS + GROUPS - 1) // GROUPS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(g * PER, tl.minimum((g + 1) * PER, TOP_K)):
        r = t * TOP_K + j
        e = tl.load(ids_ptr + r).to(tl.int64)
        acc = _row_dot(a_ptr + (t * SLOTS + j) * stride_at, w_ptr + e * stride_we, stride_wn, stride_wk, offs_n,
                       n_ok, K, K, BLOCK_N, BLOCK_K)
        if HAS_BIAS:  # inside the routing weight: the model weights each expert's biased output
            acc += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n, n_ok)
        total += tl.load(topw_ptr + r).to(tl.float32) * acc
    if N_SHARED > 0:
        for c in range(tl.maximum(g * PER, TOP_K) - TOP_K, tl.minimum((g + 1) * PER, SLOTS) - TOP_K):
            first = c * K  # the chunk's first column of the shared down weight
            total += _row_dot(a_ptr + (t * SLOTS + TOP_K + c) * stride_at, sh_down_ptr + first * stride_shk,
                              stride_shn, stride_shk, offs_n, n_ok, K, sh_width - first, BLOCK_N, BLOCK_K)
    if GROUPS == 1:
        tl.store(out_ptr + t * stride_ot + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(out_ptr + pid * N + offs_n, total, mask=n_ok)


@triton.jit
def slot_sum_kernel(part_ptr, out_ptr, N, stride_ot, GROUPS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, n] = sum_g part[t, g, n] (float32 [T, GROUPS, N], contiguous), added in order g = 0, 1, ...: the
    same result at every call."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        total += tl.load(part_ptr + (t * GROUPS + g) * N + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + t * stride_ot + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
