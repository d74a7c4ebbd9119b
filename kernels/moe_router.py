"""The MoE router in one Triton kernel: router matmul, softmax or sigmoid scores, optional score bias and
DeepSeek-style group-limited selection, top-k, renormalisation and scaling.

Stock transformers runs this as 5-12 separate ops (linear, softmax, topk, sum, divide, and for DeepSeek a
second topk over groups plus a scatter and a masked fill); each reads and writes a [T, E] tensor. Here one
program owns BLOCK_T tokens and keeps their [BLOCK_T, E] scores in registers from the matmul to the output.
At decode sizes a large router matrix is first multiplied by many programs, each over a chunk of H, and the
selection then reads their float32 partial sums (`split_plan`): two launches instead of one SM streaming it all.
Past decode sizes the logits come from torch's matmul, as the model's own router computes them, and the selection
kernel reads them as its one part (`gemm_logits`): the one-kernel router re-reads the router matrix per program.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.interpreter import INTERPRETED
from kernels.launch import cdiv, fast, launch_fitting, next_pow2, sm_count

SOFTMAX, SIGMOID = 0, 1
# float32 router logits (DeepSeek) at decode sizes on tensor cores: three TF32 products carry float32's precision
# (about 1e-6 relative); an "ieee" dot on the CUDA cores made a DeepSeek-V3 router at 1-16 tokens 2.5x slower than
# stock (bench/results/moe_grid_h200*.csv). At 16k tokens tf32x3 was slower still (its three products need the
# shared memory of the smaller tile fallbacks): there "ieee", and the dispatcher runs stock's cuBLAS where it wins.
# The interpreter computes in float32 anyway. Since the split router (`split_plan`) takes every float32 router at
# decode sizes, this applies only where the split is switched off (`route(split=False)`).
DECODE_FP32_PRECISION = "ieee" if INTERPRETED else "tf32x3"


@dataclass(frozen=True)
class RouterSpec:
    """How an architecture turns router logits into top-k weights.

    scoring: "softmax" (Mixtral, OLMoE, Qwen-MoE) or "sigmoid" (DeepSeek-V3).
    renormalize: divide the k kept weights by their sum.
    n_group / topk_group: DeepSeek group-limited routing (experts split into n_group groups, a group scored by
        the sum of its two best biased scores, only the topk_group best groups eligible); 1/1 disables it.
    scaling: multiply the final weights (DeepSeek `routed_scaling_factor`).
    fp32_logits: compute the router matmul in float32 (DeepSeek); otherwise in the input dtype with float32
        accumulation, rounded to the input dtype like `F.linear` does.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    fp32_logits: bool = False


@triton.jit
def logits_tile(x_ptr, w_ptr, rows, cols, h_lo, h_hi, stride_xt, stride_we,
                FP32_LOGITS: tl.constexpr, DOT_F32: tl.constexpr, FP32_PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    """float32 [BLOCK_T, BLOCK_E] = x[rows, h_lo:h_hi] . w[cols, h_lo:h_hi]^T. rows and cols must be in bounds:
    callers point the ones past the end at row or column 0 and never use what they give."""
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    kk = tl.arange(0, BLOCK_H)
    for h0 in range(h_lo, h_hi, BLOCK_H):
        h = h0 + kk
        h_ok = h < h_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xt + h[None, :], mask=h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_we + h[:, None], mask=h_ok[:, None], other=0.0)
        if FP32_LOGITS:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=FP32_PRECISION)
        elif DOT_F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w)
    return acc


@triton.jit
def _router_partial_logits_kernel(
    x_ptr, w_ptr, part_ptr, T, H, E, stride_xt, stride_we, h_chunk, pe,
    FP32_LOGITS: tl.constexpr, DOT_F32: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """part[s, t, e] = x[t, s*h_chunk : (s+1)*h_chunk] . w[e, same]: one program per (token block, expert block,
    chunk of H), so that at decode sizes the router matrix streams through every SM instead of one."""
    pid_t, pid_e, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    # Out-of-range rows and experts read row/column 0 (in bounds) and are never stored.
    rows_in = tl.where(rows < T, rows, 0)
    cols_in = tl.where(cols < E, cols, 0)
    h_lo = split * h_chunk
    acc = logits_tile(x_ptr, w_ptr, rows_in, cols_in, h_lo, tl.minimum(h_lo + h_chunk, H), stride_xt, stride_we,
                      FP32_LOGITS, DOT_F32, FP32_PRECISION, BLOCK_T, BLOCK_H, BLOCK_E)
    tl.store(part_ptr + split * T * pe + rows[:, None] * pe + cols[None, :], acc,
             mask=(rows < T)[:, None] & (cols < E)[None, :])


@triton.jit
def select_topk(logits, cols, col_ok, E, bias_ptr, scaling, SCORING: tl.constexpr, RENORM: tl.constexpr,
                HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    """From float32 logits [BLOCK_T, BLOCK_E] (columns `cols` of E, valid where `col_ok`) to (top-k weights float32
    [BLOCK_T, BLOCK_K], top-k expert ids int32 [BLOCK_T, BLOCK_K], best first; columns past TOP_K are 0): scores,
    optional bias for the choice, group-limited selection, top-k, renormalisation and scaling, as RouterSpec
    says."""
    neg_inf = float("-inf")
    if SCORING == 0:
        z = tl.where(col_ok[None, :], logits, neg_inf)
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok[None, :], choice, neg_inf)

    if N_GROUP > 1:
        # A group's score is the sum of its two best biased scores; only the TOPK_GROUP best groups stay eligible.
        group_size = E // N_GROUP
        gid = cols // group_size
        garange = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            c = tl.where((gid == g)[None, :], choice, neg_inf)
            best = tl.argmax(c, axis=1)
            first = tl.max(c, axis=1)
            second = tl.max(tl.where(cols[None, :] == best[:, None], neg_inf, c), axis=1)
            gscore = tl.where((garange == g)[None, :], (first + second)[:, None], gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gbest = tl.argmax(gscore, axis=1)
            keep = keep | (gid[None, :] == gbest[:, None])
            gscore = tl.where(garange[None, :] == gbest[:, None], neg_inf, gscore)
        choice = tl.where(keep, choice, neg_inf)

    # Top-k by repeated argmax: k is small (<= 16) and the row already sits in registers.
    karange = tl.arange(0, BLOCK_K)
    topw = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    topi = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1).to(tl.int32)
        hit = cols[None, :] == best[:, None]
        wj = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        choice = tl.where(hit, neg_inf, choice)
        topw = tl.where((karange == j)[None, :], wj[:, None], topw)
        topi = tl.where((karange == j)[None, :], best[:, None], topi)
    if RENORM:
        denom = tl.sum(topw, axis=1)
        if SCORING == 1:
            denom = denom + 1e-20
        topw = topw / denom[:, None]
    topw = topw * scaling
    return topw, topi


@triton.jit
def _router_kernel(
    x_ptr, w_ptr, bias_ptr, logits_ptr, topw_ptr, topi_ptr, part_ptr, n_parts, pe,
    T, H, E, stride_xt, stride_we, scaling,
    SCORING: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_LOGITS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_F32: tl.constexpr, FP32_PRECISION: tl.constexpr, FROM_PARTS: tl.constexpr,
    BLOCK_P: tl.constexpr = 1, STORE_LOGITS: tl.constexpr = True,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E

    if FROM_PARTS:
        # The split matmul's partial sums, BLOCK_P parts per load (one load per part waited on its own round trip:
        # 66 parts of a DeepSeek-V3 router took 31 us), added in a fixed order: the same logits at every call.
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        pp = tl.arange(0, BLOCK_P)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        for p0 in range(0, n_parts, BLOCK_P):
            p = p0 + pp
            acc += tl.sum(tl.load(part_ptr + p[:, None, None] * T * pe + (rows[:, None] * pe + cols[None, :])[None],
                                  mask=(p < n_parts)[:, None, None] & tile_ok[None], other=0.0), axis=0)
    else:
        # Router matmul: [BLOCK_T, H] x [H, E], float32 accumulation.
        acc = logits_tile(x_ptr, w_ptr, tl.where(row_ok, rows, 0), tl.where(col_ok, cols, 0), 0, H, stride_xt,
                          stride_we, FP32_LOGITS, DOT_F32, FP32_PRECISION, BLOCK_T, BLOCK_H, BLOCK_E)
    if FP32_LOGITS:
        logits = acc
    else:
        # F.linear hands back logits rounded to the input dtype; the scores are computed from those.
        logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    if STORE_LOGITS:  # off where the logits came from the matmul and are already the caller's
        tl.store(logits_ptr + rows[:, None] * E + cols[None, :], logits.to(logits_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    topw, topi = select_topk(logits, cols, col_ok, E, bias_ptr, scaling, SCORING, RENORM, HAS_BIAS, N_GROUP,
                             TOPK_GROUP, TOP_K, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_G)
    karange = tl.arange(0, BLOCK_K)
    out_mask = row_ok[:, None] & (karange < TOP_K)[None, :]
    offs = rows[:, None] * TOP_K + karange[None, :]
    tl.store(topw_ptr + offs, topw.to(topw_ptr.dtype.element_ty), mask=out_mask)
    tl.store(topi_ptr + offs, topi, mask=out_mask)


# Decode sizes: the router matmul split over H chunks and expert blocks (`_router_partial_logits_kernel`), then the
# selection from the partial sums, where one program per 16 tokens would stream the router matrix through a single
# SM, one H-step (and one round trip to memory) after another. First for large routers only (the H200 grid had the
# one-kernel router at 254-446 us as a graph replay on DeepSeek-V3/Kimi-K2 layers against stock's 55-75). Timed
# inside graphs of 20 calls (one H200, 12 routers E = 8-384, H = 576-7168, bf16 and float32;
# bench/results/decode_sweep_h200.csv) the split won at 1 and 4 tokens on every router, small ones included (E = 8,
# H = 576: 4.2 us against 6.4; Qwen3's 128 x 2048: 6.2 against 13.9), and at 16-64 tokens on all but the two with
# 128 experts, which it costs about 1 us (128 x 2048: 15.8 against 14.5). So every decode-sized call splits; the
# dispatcher still times our router against the model's own.
SPLIT_MAX_TOKENS = 64
SPLIT_BLOCK_E = 64
SPLIT_BLOCK_H = 64


def split_plan(T: int, E: int, H: int, programs: int, force: bool = False) -> tuple[int, int] | None:
    """(H chunk, number of chunks) for the split router at T tokens, aiming at about `programs` programs in all;
    None where the one-kernel router runs (more than SPLIT_MAX_TOKENS tokens), unless `force`."""
    if not force and T > SPLIT_MAX_TOKENS:
        return None
    tiles = cdiv(max(T, 1), 16) * cdiv(E, SPLIT_BLOCK_E)
    parts = max(1, min(cdiv(programs, tiles), cdiv(H, SPLIT_BLOCK_H)))
    chunk = cdiv(cdiv(H, parts), SPLIT_BLOCK_H) * SPLIT_BLOCK_H
    return chunk, cdiv(H, chunk)


# Past decode sizes, routers of a multiple of this many experts take the matmul logits (`gemm_logits`).
GEMM_EXPERTS_MULTIPLE = 16


def gemm_logits(T: int, experts: int) -> bool:
    """Whether the router's logits come from torch's matmul (cuBLAS, the model's own F.linear) rather than our
    one-kernel router: past decode sizes, for a number of experts that is a multiple of GEMM_EXPERTS_MULTIPLE.

    The one-kernel router reads the whole router matrix once per program of 16-64 tokens, so its reads grow with
    T x E x H. Timed on one H200 as graph replays at 256 and 16,384 tokens (12 routers, E = 8-384, H = 576-7168,
    bf16 and float32 logits; bench/results/decode_router_gemm_h200.csv): the matmul logits were faster at both
    counts on every router whose E is a multiple of 16 (E = 16-384; at 16,384 tokens a 384 x 7168 bf16 router 206
    against 1792 us, DeepSeek-V3's 256 x 7168 float32 one 1552 against 7278, Qwen3's 128 x 2048 39 against 50; at
    256 tokens 7.8-49 us against 14-662), and slower where it is not: E = 60 (Qwen1.5/2-MoE) 18.6 against 12.9 us
    at 256 and 68 against 32 at 16,384 (cuBLAS on an output row of 60), E = 8 within 10% either way (one 9.3 against
    10.8 us at 16,384). The split matmul (`split_plan`) stays below SPLIT_MAX_TOKENS: at 16,384 tokens it was the
    slowest of the three everywhere."""
    return T > SPLIT_MAX_TOKENS and experts % GEMM_EXPERTS_MULTIPLE == 0


def route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    weights_dtype: torch.dtype = torch.float32,
    tiles: tuple[int, int, int, int] | None = None,
    split: bool | None = None,
    gemm: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to experts: one kernel launch, or two at decode sizes on a large router matrix (see
    `split_plan`), or past decode sizes the logits from torch's matmul and the selection in one launch
    (`gemm_logits`).

    hidden: [T, H] (bf16/fp16/fp32); weight: [E, H] router matrix; bias: optional [E] score-correction bias
    (added for the choice only, as DeepSeek-V3 does). Returns (logits [T, E] in the input dtype, or float32 when
    spec.fp32_logits; top-k weights [T, k] in weights_dtype; top-k expert ids [T, k] int32, best first).
    tiles: (tokens per program, H step, warps, stages) in place of the built-in choice of the one-kernel router
    (benchmarks).
    split: force the split matmul on (True) or off (False) at any size; None: `split_plan` decides.
    gemm: force the matmul logits on (True) or off (False); None: `gemm_logits` decides (split takes precedence).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"route: hidden [T, H] and weight [E, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    T, H = hidden.shape
    E = weight.shape[0]
    if spec.scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"route: scoring must be 'softmax' or 'sigmoid', got {spec.scoring!r}")
    if not 1 <= spec.top_k <= min(E, 32):
        raise ValueError(f"route: top_k={spec.top_k} must be in [1, min(E={E}, 32)]")
    if spec.n_group > 1 and (E % spec.n_group or not 1 <= spec.topk_group <= spec.n_group):
        raise ValueError(f"route: E={E} must split into n_group={spec.n_group} groups and "
                         f"topk_group={spec.topk_group} must be in [1, n_group]")
    if spec.n_group > 1 and E // spec.n_group < 2:
        raise ValueError("route: group-limited routing scores a group by its two best experts; groups need >= 2")
    hidden = hidden.contiguous()
    weight = weight.contiguous().to(hidden.dtype) if not spec.fp32_logits else weight.contiguous()
    plan = None if split is False else split_plan(T, E, H, 2 * sm_count(hidden.device), force=bool(split))
    from_matmul = T > 0 and plan is None and (gemm if gemm is not None else gemm_logits(T, E))
    if from_matmul:
        # The logits as the model's own router computes them (F.linear: float32 for DeepSeek-style routers, else
        # the input dtype, rounded to it); the selection kernel reads them as its one "part".
        logits = F.linear(hidden.float(), weight.float()) if spec.fp32_logits else F.linear(hidden, weight)
    else:
        logits = torch.empty(T, E, device=hidden.device, dtype=torch.float32 if spec.fp32_logits else hidden.dtype)
    topw = torch.empty(T, spec.top_k, device=hidden.device, dtype=weights_dtype)
    topi = torch.empty(T, spec.top_k, device=hidden.device, dtype=torch.int32)
    if T == 0:
        return logits, topw, topi
    block_e = max(16, next_pow2(E))
    # Keep the [BLOCK_T, BLOCK_E] score tile in registers: fewer tokens per program for wide routers.
    block_t = 16 if block_e >= 128 else 32
    block_h = 64 if block_e >= 128 else 128
    warps, stages = 4, 3
    if T >= 8192:
        # Many tokens: more tokens per program (H200 runs of bench.moe_gemm at T=16384: 72-78 us against 105-125
        # for the smaller tiles, 16 < E <= 64; E = 128 keeps 32 tokens over 4 warps, 109 us against 132).
        block_t, block_h, warps = (64, 128, 4) if block_e <= 16 else (64, 64, 8) if block_e <= 64 else (32, 128, 4)
    if T <= 64:
        # Decode: one or few programs stream the whole [E, H] router matrix; fewer, wider steps keep more bytes
        # in flight (each step waits on its loads).
        # A [BLOCK_H, BLOCK_E] weight tile of at most 16K elements (64 KiB at fp32) per step.
        block_t, block_h, warps = 16, max(32, min(256, 16384 // block_e // (2 if spec.fp32_logits else 1))), 8
    if tiles is not None:
        block_t, block_h, warps, stages = tiles
    if bias is not None:
        bias = bias.contiguous()
    parts, n_parts, pe = topw, 0, 0  # (unused pointer, no parts) for the one-kernel router
    if from_matmul:
        parts, n_parts, pe = logits, 1, E
    elif plan is not None:
        chunk, n_parts = plan
        # Rows of the partial sums padded to 16 floats: aligned rows load 16 bytes at a time (at E = 60 the
        # unpadded rows took the selection from 8 to 21 us at 4 tokens, one H200).
        pe = cdiv(E, 16) * 16
        parts = torch.empty(n_parts, T, pe, device=hidden.device, dtype=torch.float32)

        def launch_parts(stages: int) -> None:
            # float32 logits on the CUDA cores ("ieee"): spread over many programs they cost little, and they are
            # float32's own products, as stock's F.linear in float32 computes them.
            fast(_router_partial_logits_kernel)[(cdiv(T, 16), cdiv(E, SPLIT_BLOCK_E), n_parts)](
                hidden, weight, parts, T, H, E, hidden.stride(0), weight.stride(0), chunk, pe,
                FP32_LOGITS=spec.fp32_logits, DOT_F32=INTERPRETED, FP32_PRECISION="ieee",
                BLOCK_T=16, BLOCK_H=SPLIT_BLOCK_H, BLOCK_E=SPLIT_BLOCK_E, num_warps=4, num_stages=stages,
            )

        # Small tiles (20 KiB of shared memory at two stages), but like every launch here, one that cannot fail.
        launch_fitting(("router parts", hidden.dtype, weight.dtype, spec.fp32_logits), (2, 1), launch_parts)

    def launch(c: tuple[int, int, int, int]) -> None:
        bt, bh, nw, ns = c
        fast(_router_kernel)[(cdiv(T, bt),)](
            hidden, weight, bias if bias is not None else topw, logits, topw, topi, parts, n_parts, pe,
            T, H, E, hidden.stride(0), weight.stride(0), float(spec.scaling),
            SCORING=SOFTMAX if spec.scoring == "softmax" else SIGMOID, RENORM=spec.renormalize,
            HAS_BIAS=bias is not None, FP32_LOGITS=spec.fp32_logits,
            N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, TOP_K=spec.top_k,
            BLOCK_T=bt, BLOCK_H=bh, BLOCK_E=block_e, BLOCK_K=next_pow2(spec.top_k),
            BLOCK_G=max(2, next_pow2(spec.n_group)), DOT_F32=INTERPRETED,
            FP32_PRECISION=DECODE_FP32_PRECISION if T <= 64 else "ieee", FROM_PARTS=n_parts > 0,
            BLOCK_P=block_p, STORE_LOGITS=not from_matmul, num_warps=nw, num_stages=ns,
        )

    block_p = 1
    if n_parts:  # the selection alone: no matmul tile to size, up to 16 tokens per program, a wide score tile
        block_t, block_h, warps, stages = min(16, next_pow2(T)), 16, 8 if block_e >= 256 else 4, 1
        # One token: parts loaded together, a [BLOCK_P, 1, BLOCK_E] float32 tile of at most 8K elements (one H200,
        # graph replays: 4.4-20 us against 5.6-31 one part per load). With more tokens per program the 3-D sum
        # measured slower than a load per part (E = 128, 16 tokens: 73 us against 14), so it stays at one.
        if block_t == 1:
            block_p = max(1, min(next_pow2(n_parts), 8192 // block_e))
    choice = (block_t, block_h, warps, stages)
    # A wide router (E = 256, 384) in float32 can ask more shared memory than the GPU has (DeepSeek-V3 at
    # T = 16384: 288 KiB of 227); the heuristic's choice comes first, then ones that need less.
    launch_fitting((choice, block_e, hidden.dtype, weight.dtype, spec), router_fallbacks(choice), launch)
    return logits, topw, topi


@lru_cache(maxsize=None)
def router_fallbacks(choice: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int], ...]:
    """`choice` (tokens per program, H step, warps, stages), then configs needing ever less shared memory: fewer
    stages, then a shorter H step, then fewer tokens per program (each halving, down to 16 and 1 stage)."""
    bt, bh, nw, ns = choice
    out = [choice]
    while ns > 1 or bh > 16 or bt > 16:
        if ns > 1:
            ns -= 1
        elif bh > 16:
            bh //= 2
        else:
            bt //= 2
        out.append((bt, bh, nw, ns))
    return tuple(out)  # cached: every router launch asks
