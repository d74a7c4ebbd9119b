"""The decode path past a handful of tokens (5-16; from one token for transposed weights, see
moe_experts.decode_path): each routed expert's weights read once for all the tokens routed to it, with no
alignment pass.

The per-slot GEMV (moe_gemv) reads an expert once per slot that picks it: at 16 tokens x top-8 over 128 experts
that is 128 expert reads where about 80 experts are distinct, and the grouped GEMM (moe_grouped_gemm) needs the
alignment's sort and padding first (four launches) and ran at 30-41% of the weight-read floor on the grid's small
layers at 16 tokens (kernels/NOTES.md). Here the grouping happens inside each program:

- program (s, column tile) for routed slot s (ids flattened, s = t * TOP_K + j) loads all the ids (at most
  MAX_SLOTS of them) and runs only if s is the first slot routed to its expert e; it then gathers every slot
  routed to e, in slot order, as up to BLOCK_M rows (a loop over blocks of rows should a token repeat an expert)
  and multiplies them by e's weight tile on the tensor cores (a 16-row tile; decode is memory-bound, the padding
  rows cost no bandwidth);
- programs past the routed slots are the shared expert's chunks (width cut like the GEMV path's, rows: every
  token), so a shared expert costs no launch of its own;
- gate/up writes the activation at row t * S + j (S = TOP_K + N_SHARED slots per token), the GEMV path's layout;
  down writes each slot's weighted product as float32 into part [T, S, H], and moe_gemv.slot_sum_kernel adds a
  token's slots in slot order (no atomics: the same output at every call).

Three launches, as on the GEMV path; the programs of slots that are not an expert's first exit after one load of
the ids. On the grid at 16 tokens (one H200, graph replays) the mid-size layers (Qwen3, Qwen2-MoE, OLMoE, 60 and 128
gated experts) went from 30-66% of the weight-read floor to 51-76%, and GPT-OSS from 46% (stock's grouped_mm) to
78% (kernels/NOTES.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.moe_grouped_gemm import bias_cols, gated_act

# The ids of a call, loaded whole by every program: T * top-k at most this (16 tokens x top-8).
MAX_SLOTS = 128


@triton.jit
def _owner(ids_ptr, s, n_slots, BLOCK_S: tl.constexpr):
    # Slot s's expert e, whether s is the first slot routed to e, and the mask over slots 0..BLOCK_S-1 routed to e.
    offs = tl.arange(0, BLOCK_S)
    ok = offs < n_slots
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
    e = tl.load(ids_ptr + s)
    match = ok & (ids == e)
    earlier = tl.sum((match & (offs < s)).to(tl.int32), axis=0)
    return e.to(tl.int64), earlier == 0, match, offs


@triton.jit
def _match_rows(match, offs, m0, BLOCK_M: tl.constexpr):
    # The slots of matches m0 .. m0 + BLOCK_M - 1 (in slot order) and which of those rows exist.
    rank = tl.cumsum(match.to(tl.int32), axis=0) - 1
    want = m0 + tl.arange(0, BLOCK_M)
    hit = match[None, :] & (rank[None, :] == want[:, None])
    slots = tl.sum(tl.where(hit, offs[None, :], 0), axis=1)
    return slots, tl.sum(hit.to(tl.int32), axis=1) > 0


@triton.jit
def _dots(x_ptr, tok, valid, stride_xt, g_base, u_base, row_stride, stride_k, offs_n, n_ok, K, sg_ptr, stride_sgk,
          n0, N, WITH_UP: tl.constexpr, WITH_SGATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PAIRED: tl.constexpr = False):
    # Float32 [BLOCK_M, BLOCK_N] products of rows x[tok] with weight rows offs_n (row r at base + r * row_stride,
    # element k at + k * stride_k): gate's, up's (WITH_UP, else zeros), and x . sgate per row (WITH_SGATE, else 0).
    # PAIRED: gate row n and up row n are elements 2n and 2n + 1 of each contiguous input row at g_base (GPT-OSS's
    # transposed, interleaved gate/up), loaded as one [BLOCK_K, 2 BLOCK_N] tile from column 2 n0 and split in
    # registers: two stride-2 loads would not vectorise (a stride of 2 is not specialised), and ran 4x slower.
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xt
    cols = offs_n[None, :] * row_stride
    cols2 = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        if PAIRED:
            w2 = tl.load(g_base + k[:, None] * stride_k + cols2[None, :],
                         mask=k_ok[:, None] & (cols2 < 2 * N)[None, :], other=0.0)
            wg, wu = tl.split(tl.reshape(w2, (BLOCK_K, BLOCK_N, 2)))
        else:
            m = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(g_base + k[:, None] * stride_k + cols, mask=m, other=0.0)
            if WITH_UP:
                wu = tl.load(u_base + k[:, None] * stride_k + cols, mask=m, other=0.0)
        if DOT_F32:  # the interpreter's dot on half types
            x, wg = x.to(tl.float32), wg.to(tl.float32)
        acc_g = tl.dot(x.to(wg.dtype), wg, acc_g)
        if WITH_UP:
            if DOT_F32:
                wu = wu.to(tl.float32)
            acc_u = tl.dot(x.to(wu.dtype), wu, acc_u)
        if WITH_SGATE:
            acc_s += x.to(tl.float32) * tl.load(sg_ptr + k * stride_sgk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return acc_g, acc_u, tl.sum(acc_s, axis=1)


@triton.jit
def gate_up_rows_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, n_slots, T, K, N,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    gate_off, up_off, row_mult,
    bias_ptr, stride_be, stride_bn, alpha, limit,
    sh_gate_ptr, sh_up_ptr, stride_shn, stride_shk, sh_width, sgate_ptr, stride_sgk,
    TOP_K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr,
    N_SHARED: tl.constexpr = 0, HAS_SGATE: tl.constexpr = False, PAIRED: tl.constexpr = False,
):
    """out[t * S + j, n] = act(x[t] . Wg[e, n] + bg[e, n]) * (x[t] . Wu[e, n] + bu[e, n]), e = ids[t, j], S = TOP_K
    + N_SHARED, n < N = I; for j = TOP_K + c (chunk c of the shared expert), the same with rows c * N + n of the
    shared gate / up weights [sh_width, K] (zero past sh_width), times sigmoid(x[t] . sgate) (HAS_SGATE).

    Grid (n_slots + N_SHARED, cdiv(N, BLOCK_N)), n_slots = T * TOP_K <= BLOCK_S. Gate/up row n of a routed expert is
    weight row n * row_mult + gate_off / up_off, its bias column the same in bias [E, 2I] (HAS_BIAS). PAIRED: the
    interleaved layout with rows adjacent in memory (transposed weights, stride_wn 1: row_mult 2, gate_off 0,
    up_off 1), loaded as pairs."""
    pid = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    SLOTS: tl.constexpr = TOP_K + N_SHARED
    if pid < n_slots:
        e, first, match, offs = _owner(ids_ptr, pid, n_slots, BLOCK_S)
        if first:
            w_base = w_ptr + e * stride_we
            for m0 in range(0, tl.sum(match.to(tl.int32), axis=0), BLOCK_M):
                slots, valid = _match_rows(match, offs, m0, BLOCK_M)
                tok = slots // TOP_K
                g, u, _ = _dots(x_ptr, tok, valid, stride_xt, w_base + gate_off * stride_wn,
                                w_base + up_off * stride_wn, row_mult * stride_wn, stride_wk, offs_n, n_ok, K,
                                w_ptr, 0, n0, N, True, False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PAIRED)
                if HAS_BIAS:  # before the activation, as the model adds it to the projection's output
                    g += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + gate_off, n_ok)[None, :]
                    u += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n * row_mult + up_off, n_ok)[None, :]
                h = gated_act(g, u, ACT, alpha, limit)
                rows = (tok * SLOTS + slots % TOP_K).to(tl.int64)
                tl.store(out_ptr + rows[:, None] * stride_ot + offs_n[None, :], h.to(out_ptr.dtype.element_ty),
                         mask=valid[:, None] & n_ok[None, :])
    elif N_SHARED > 0:  # compiled only with a shared expert (its pointers are None without)
        c = pid - n_slots
        first_row = c.to(tl.int64) * N  # the chunk's first row of the shared weights
        ok = n_ok & (first_row + offs_n < sh_width)
        for t0 in range(0, T, BLOCK_M):
            tok = t0 + tl.arange(0, BLOCK_M)
            valid = tok < T
            g, u, s = _dots(x_ptr, tok, valid, stride_xt, sh_gate_ptr + first_row * stride_shn,
                            sh_up_ptr + first_row * stride_shn, stride_shn, stride_shk, offs_n, ok, K,
                            sgate_ptr, stride_sgk, n0, N, True, HAS_SGATE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
            h = gated_act(g, u, ACT, alpha, limit)  # 0 on masked columns: act(0) * 0
            if HAS_SGATE:
                h = h * tl.sigmoid(s)[:, None]
            rows = (tok * SLOTS + TOP_K + c).to(tl.int64)
            tl.store(out_ptr + rows[:, None] * stride_ot + offs_n[None, :], h.to(out_ptr.dtype.element_ty),
                     mask=valid[:, None] & n_ok[None, :])


@triton.jit
def down_rows_kernel(
    a_ptr, w_ptr, ids_ptr, topw_ptr, part_ptr, n_slots, T, K, N,
    stride_at, stride_we, stride_wn, stride_wk,
    bias_ptr, stride_be, stride_bn,
    sh_down_ptr, stride_shn, stride_shk, sh_width,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr, N_SHARED: tl.constexpr = 0,
):
    """part[t, j, n] = topw[t, j] * (a[t * S + j] . Wd[e, n] + bd[e, n]) (float32 [T, S, N], N = H, K = I), e =
    ids[t, j]; for j = TOP_K + c: a[t * S + j] . Wsd[n, c*K : (c+1)*K] (the shared down weight [N, sh_width],
    columns past sh_width 0). Grid as gate_up_rows_kernel's over N; moe_gemv.slot_sum_kernel adds part over j."""
    pid = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    SLOTS: tl.constexpr = TOP_K + N_SHARED
    if pid < n_slots:
        e, first, match, offs = _owner(ids_ptr, pid, n_slots, BLOCK_S)
        if first:
            for m0 in range(0, tl.sum(match.to(tl.int32), axis=0), BLOCK_M):
                slots, valid = _match_rows(match, offs, m0, BLOCK_M)
                rows = (slots // TOP_K) * SLOTS + slots % TOP_K
                acc, _, _ = _dots(a_ptr, rows, valid, stride_at, w_ptr + e * stride_we, w_ptr, stride_wn,
                                  stride_wk, offs_n, n_ok, K, w_ptr, 0, n0, N, False, False, BLOCK_M, BLOCK_N,
                                  BLOCK_K, DOT_F32)
                if HAS_BIAS:  # inside the routing weight: the model weights each expert's biased output
                    acc += bias_cols(bias_ptr, e, stride_be, stride_bn, offs_n, n_ok)[None, :]
                acc = acc * tl.load(topw_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
                tl.store(part_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :], acc,
                         mask=valid[:, None] & n_ok[None, :])
    elif N_SHARED > 0:
        c = pid - n_slots
        first_col = c.to(tl.int64) * K  # the chunk's first column of the shared down weight
        for t0 in range(0, T, BLOCK_M):
            tok = t0 + tl.arange(0, BLOCK_M)
            valid = tok < T
            rows = tok * SLOTS + TOP_K + c
            acc, _, _ = _dots(a_ptr, rows, valid, stride_at, sh_down_ptr + first_col * stride_shk, sh_down_ptr,
                              stride_shn, stride_shk, offs_n, n_ok, tl.minimum(K, sh_width - first_col), sh_down_ptr,
                              0, n0, N, False, False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
            tl.store(part_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :], acc,
                     mask=valid[:, None] & n_ok[None, :])
