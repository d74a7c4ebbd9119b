"""The whole MoE block at decode sizes (1-16 tokens) in one launch: router, routed and shared experts, the
weighted sum, the output in the model's dtype.

Why: on the smallest layers the weight-read floor is a few microseconds (SmolLM2-MoE's 8 x 576 x 1536 at one
token: 2.5 us) while the block on separate kernels (router, gate/up, down, slot sum) took 14 us as a graph replay
on one H200: each dependent launch waits out its own start and a round trip to memory, whatever it reads
(kernels/NOTES.md). Folding the slot sum alone into down measured no faster; what is left is one launch.

- One program per (slot, tile of BLOCK_I intermediate columns). Slot j < T * k is token j // k's (j % k)-th
  choice; the slots after them are the shared expert's chunks (its width cut into chunks of the routed width, as
  moe_gemv does).
- ROUTE: every program computes the router for all T tokens itself (logits, scores, selection: moe_router's own
  `logits_tile` and `select_topk`), reading a small router matrix mostly from L2, so no launch precedes the
  experts. Otherwise the programs read the top-k a router launch wrote.
- An expert chosen by several tokens is read once: the program of its first slot (token-major order) works for
  every token that chose it, its other slots' programs leave at once.
- A program computes act(x Wg) * (x Wu) on its BLOCK_I columns for those tokens, multiplies that by the same
  columns of the down weight (the block is linear in the intermediate, so each tile's share of the output is
  complete on its own), and adds the weighted [T, H] share into a float32 accumulator with atomics: no grid-wide
  wait between gate/up and down.
- Every program then counts itself in on a counter (a CTA barrier, then an acquire-release atomic at GPU scope);
  the last to arrive writes the output in the model's dtype and zeroes the accumulator and the counter for the
  next call: no memset launch before, no cast launch after.

The accumulator and counter live in a workspace kept per device (`workspace`) that every call leaves zeroed; two
calls of this kernel on one device must not overlap in time (one stream, or streams that are synchronised, as a
model's layers are). The float32 atomic sum has no fixed order: the output can differ in its last bits from one
call to the next (the other decode paths sum in a fixed order).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from kernels.interpreter import INTERPRETED
from kernels.launch import cdiv, fast, launch_fitting, next_pow2
from kernels.moe_experts import ExpertWeights, SharedExpert, shared_args
from kernels.moe_grouped_gemm import ACT_CLAMPED_SWIGLU, KERNEL_ACTIVATIONS, gated_act
from kernels.moe_router import SIGMOID, SOFTMAX, RouterSpec, logits_tile, select_topk

MAX_TOKENS = 16  # one tensor-core tile of rows holds every token
# Up to this many bytes the router matrix is recomputed by every program (ROUTE): it then costs reads from L2,
# not a launch. Larger routers run as their own launch and the block kernel reads their top-k.
ROUTE_INSIDE_MAX_BYTES = 256 << 10
MAX_ROUTER_EXPERTS = 256  # a [16, E] score tile in registers


@dataclass(frozen=True)
class BlockTiles:
    """Intermediate columns per program, H step of gate/up, output columns per down step, warps, stages."""

    block_i: int = 16
    block_h: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=None)
def block_tiles(experts_read: int, hidden: int, width: int, sms: int = 132) -> BlockTiles:
    """Tiles for a block reading `experts_read` expert-sized weight sets (distinct routed experts, at most
    min(E, T * k), plus shared chunks) of hidden size `hidden` and expert width `width` on `sms` multiprocessors:
    the widest intermediate tile that still gives every SM a program (a program's weights stream through one SM,
    so fewer programs than SMs leave bandwidth unused)."""
    block_i = 16
    for bi in (64, 32):
        if experts_read * cdiv(width, bi) >= sms:
            block_i = bi
            break
    return BlockTiles(block_i=block_i, block_h=128 if hidden >= 1024 else 64)


_WORKSPACES: dict[tuple[str, int | None], torch.Tensor] = {}


def workspace(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 accumulator [>= numel], int32 counter [1]) on `device`, both zero, in one allocation kept per device
    and grown when a call needs more. The kernel leaves both zero again, so no call pays a memset. A call while a
    CUDA graph is being captured reuses what an earlier (eager) call allocated; growing inside a capture allocates
    from the graph's pool and records the zeroing in the graph (harmless: the buffer is zero there anyway)."""
    key = (device.type, device.index)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel + 1:
        # float32 zeros and int32 zeros are the same bits: one int32 buffer viewed both ways.
        buf = torch.zeros(max(numel, MAX_TOKENS * 1024) + 1, device=device, dtype=torch.int32)
        _WORKSPACES[key] = buf
    return buf[:-1].view(torch.float32), buf[-1:]


@triton.jit
def _expert_tile(x_ptr, stride_xt, g_base, u_base, row_stride, stride_k, d_base, d_sn, d_sk, i_offs, i_end, wt,
                 sel, acc_ptr, T, H,
                 ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DIAG: tl.constexpr = 0):
    # One expert's intermediate columns i_offs (valid below i_end) for the tokens `sel` [BLOCK_T], weighted by wt
    # [BLOCK_T]: acc[t, :] += wt[t] * down[:, i_offs] . act(x[t] Wg[i_offs]) * (x[t] Wu[i_offs]).
    toks = tl.arange(0, BLOCK_T)
    rows_x = tl.where(toks < T, toks, 0)  # rows past T read row 0 and are never added
    i_ok = i_offs < i_end
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        h_ok = h < H
        x = tl.load(x_ptr + rows_x[:, None] * stride_xt + h[None, :], mask=h_ok[None, :], other=0.0)
        wm = h_ok[:, None] & i_ok[None, :]
        wg = tl.load(g_base + i_offs[None, :] * row_stride + h[:, None] * stride_k, mask=wm, other=0.0)
        wu = tl.load(u_base + i_offs[None, :] * row_stride + h[:, None] * stride_k, mask=wm, other=0.0)
        if DOT_F32:  # the interpreter's dot runs in float32
            acc_g += tl.dot(x.to(tl.float32), wg.to(tl.float32))
            acc_u += tl.dot(x.to(tl.float32), wu.to(tl.float32))
        else:
            acc_g += tl.dot(x, wg)
            acc_u += tl.dot(x, wu)
    # Rounded to the model's dtype, as the other paths store the intermediate; 0 on masked columns (act(0) * 0).
    inter = gated_act(acc_g, acc_u, ACT).to(x_ptr.dtype.element_ty)
    nn = tl.arange(0, BLOCK_N)
    add = sel[:, None]
    if DIAG & 2:  # benchmark only: no down, the intermediate's first column added to the output's first
        tl.atomic_add(acc_ptr + toks, tl.sum(inter.to(tl.float32), axis=1), mask=sel, sem="relaxed", scope="gpu")
        H = 0
    for n0 in range(0, H, BLOCK_N):
        n = n0 + nn
        n_ok = n < H
        wd = tl.load(d_base + i_offs[:, None] * d_sk + n[None, :] * d_sn, mask=i_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if DOT_F32:
            part = tl.dot(inter.to(tl.float32), wd.to(tl.float32))
        else:
            part = tl.dot(inter, wd)
        tl.atomic_add(acc_ptr + toks[:, None] * H + n[None, :], part * wt[:, None], mask=add & n_ok[None, :],
                      sem="relaxed", scope="gpu")


@triton.jit
def block_decode_kernel(
    x_ptr, rw_ptr, rbias_ptr, topw_ptr, topi_ptr,
    gu_ptr, dn_ptr, sh_gate_ptr, sh_up_ptr, sh_down_ptr, sgate_ptr,
    acc_ptr, cnt_ptr, out_ptr,
    T, H, I, E, n_programs, scaling,
    stride_xt, stride_re,
    g_se, g_sn, g_sk, gate_off, up_off, row_mult,
    d_se, d_sn, d_sk,
    stride_shn, stride_shk, sh_width, stride_sdn, stride_sdk, stride_sgk, stride_ot,
    ROUTE: tl.constexpr, SCORING: tl.constexpr, RENORM: tl.constexpr, HAS_RBIAS: tl.constexpr,
    FP32_LOGITS: tl.constexpr, ROUND_WEIGHTS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, ACT: tl.constexpr, N_SHARED: tl.constexpr, HAS_SGATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_RH: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, FP32_PRECISION: tl.constexpr, BLOCK_EPI: tl.constexpr, FENCE: tl.constexpr,
    DIAG: tl.constexpr = 0,
):
    """out[t] = sum over t's routed experts e of w[t, e] * expert_e(x[t]) (+ the shared expert, times
    sigmoid(x[t] . sgate) with HAS_SGATE), x [T, H] with T <= BLOCK_T. Grid: (T * TOP_K + N_SHARED, I tiles);
    see the module docstring. acc [T * H] float32 and cnt [1] int32 must be zero, and are left zero."""
    pid_s = tl.program_id(0)
    pid_i = tl.program_id(1)
    toks = tl.arange(0, BLOCK_T)
    tok_ok = toks < T
    kar = tl.arange(0, BLOCK_K)
    slot_ok = tok_ok[:, None] & (kar < TOP_K)[None, :]
    n_routed = T * TOP_K
    i_offs = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)

    if pid_s < n_routed:
        if DIAG & 1:  # benchmark only: no router, slot j on expert j % E with weight 1
            topi = (toks[:, None] * TOP_K + kar[None, :]) % E
            topw = tl.full((BLOCK_T, BLOCK_K), 1.0, tl.float32)
        elif ROUTE:
            cols = tl.arange(0, BLOCK_E)
            col_ok = cols < E
            acc = logits_tile(x_ptr, rw_ptr, tl.where(tok_ok, toks, 0), tl.where(col_ok, cols, 0), 0, H, stride_xt,
                              stride_re, FP32_LOGITS, DOT_F32, FP32_PRECISION, BLOCK_T, BLOCK_RH, BLOCK_E)
            if FP32_LOGITS:
                logits = acc
            else:  # F.linear's logits are rounded to the input dtype; the scores come from those
                logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
            topw, topi = select_topk(logits, cols, col_ok, E, rbias_ptr, scaling, SCORING, RENORM, HAS_RBIAS,
                                     N_GROUP, TOPK_GROUP, TOP_K, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_G)
            if ROUND_WEIGHTS:  # routers that hand the experts weights in the input dtype
                topw = topw.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            offs = toks[:, None] * TOP_K + kar[None, :]
            topw = tl.load(topw_ptr + offs, mask=slot_ok, other=0.0).to(tl.float32)
            topi = tl.load(topi_ptr + offs, mask=slot_ok, other=0).to(tl.int32)
        flat = toks[:, None] * TOP_K + kar[None, :]
        e = tl.sum(tl.where(flat == pid_s, topi, 0))
        hit = slot_ok & (topi == e)
        if tl.min(tl.where(hit, flat, n_routed)) == pid_s:  # this slot is the expert's first: it works for all
            wt = tl.sum(tl.where(hit, topw, 0.0), axis=1)
            sel = tl.sum(hit.to(tl.int32), axis=1) > 0
            e64 = e.to(tl.int64)
            g_base = gu_ptr + e64 * g_se
            _expert_tile(x_ptr, stride_xt, g_base + gate_off * g_sn, g_base + up_off * g_sn, row_mult * g_sn, g_sk,
                         dn_ptr + e64 * d_se, d_sn, d_sk, i_offs, I, wt, sel, acc_ptr, T, H,
                         ACT, BLOCK_T, BLOCK_I, BLOCK_H, BLOCK_N, DOT_F32, DIAG)
    else:
        first = (pid_s - n_routed).to(tl.int64) * I  # the chunk's first row of the shared expert
        wt = tl.full((BLOCK_T,), 1.0, tl.float32)
        if HAS_SGATE:
            s = tl.zeros((BLOCK_T,), dtype=tl.float32)
            hh = tl.arange(0, BLOCK_H)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + hh
                h_ok = h < H
                xs = tl.load(x_ptr + tl.where(tok_ok, toks, 0)[:, None] * stride_xt + h[None, :],
                             mask=h_ok[None, :], other=0.0).to(tl.float32)
                gv = tl.load(sgate_ptr + h * stride_sgk, mask=h_ok, other=0.0).to(tl.float32)
                s += tl.sum(xs * gv[None, :], axis=1)
            wt = tl.sigmoid(s)
        _expert_tile(x_ptr, stride_xt, sh_gate_ptr + first * stride_shn, sh_up_ptr + first * stride_shn,
                     stride_shn, stride_shk, sh_down_ptr + first * stride_sdk, stride_sdn, stride_sdk, i_offs,
                     tl.minimum(I, sh_width - first), wt, tok_ok, acc_ptr, T, H,
                     ACT, BLOCK_T, BLOCK_I, BLOCK_H, BLOCK_N, DOT_F32, DIAG)

    if DIAG & 4:  # benchmark only: no count-in and no epilogue (the output is left unwritten)
        return
    # Count in. Each thread's fence orders its own atomics before what follows (an atomic's result is not
    # awaited, so without it an add can land after the last program has read the sum: measured on an H200), the
    # barrier gathers the threads, and this program's release on the counter pairs with the last one's acquire.
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [toks], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    seen = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if seen == n_programs - 1:
        eo = tl.arange(0, BLOCK_EPI)
        for o0 in range(0, T * H, BLOCK_EPI):
            o = o0 + eo
            ok = o < T * H
            v = tl.load(acc_ptr + o, mask=ok, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
            tl.store(out_ptr + (o // H) * stride_ot + o % H, v.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(acc_ptr + o, tl.zeros_like(v), mask=ok)
        tl.store(cnt_ptr, 0)


def check_router(spec: RouterSpec, weight: torch.Tensor, hidden: int) -> None:
    """Raise ValueError unless block_decode can route with this router (weight [E, H])."""
    E = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"block_decode: router weight [E, H={hidden}] expected, got {tuple(weight.shape)}")
    if E > MAX_ROUTER_EXPERTS or not 1 <= spec.top_k <= min(E, 32):
        raise ValueError(f"block_decode: routes up to {MAX_ROUTER_EXPERTS} experts with 1 <= top_k <= E; got E={E}, "
                         f"top_k={spec.top_k}")
    if spec.scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"block_decode: scoring must be 'softmax' or 'sigmoid', got {spec.scoring!r}")
    if spec.n_group > 1 and (E % spec.n_group or E // spec.n_group < 2
                             or not 1 <= spec.topk_group <= spec.n_group):
        raise ValueError(f"block_decode: E={E} does not split into n_group={spec.n_group} groups of >= 2 with "
                         f"topk_group={spec.topk_group} of them kept")


def route_inside(weight: torch.Tensor, spec: RouterSpec) -> bool:
    """Whether every program should compute this router itself (small router matrices, see ROUTE_INSIDE_MAX_BYTES)."""
    return (weight.shape[0] <= MAX_ROUTER_EXPERTS
            and weight.shape[0] * weight.shape[1] * weight.element_size() <= ROUTE_INSIDE_MAX_BYTES)


def block_decode(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    *,
    router_weight: torch.Tensor | None = None,
    spec: RouterSpec | None = None,
    router_bias: torch.Tensor | None = None,
    round_weights: bool = False,
    topk_weights: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    activation: str = "silu",
    shared: SharedExpert | None = None,
    tiles: BlockTiles | None = None,
    sms: int | None = None,
    diag: int = 0,
) -> torch.Tensor:
    """The MoE block on hidden [T, H] (T <= MAX_TOKENS, the experts' dtype) in one launch: [T, H] in hidden's dtype.

    Either route here (router_weight [E, H] and spec, optional router_bias [E] for the choice only, as
    moe_router.route takes them; round_weights: the router hands the experts weights rounded to the input dtype)
    or pass a router's topk_weights / topk_ids [T, k]. weights: the routed experts (no biases); shared: optional
    shared expert; activation: a moe_grouped_gemm activation name other than "clamped_swiglu".
    tiles: in place of `block_tiles`' choice (benchmarks); sms: the GPU's multiprocessor count (default: asked);
    diag: benchmark-only flags that leave parts out and give a wrong output (1: no router, 2: no down, 4: no
    count-in or epilogue), to time the parts.
    """
    T, H = hidden.shape
    E, I = weights.num_experts, weights.intermediate
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"block_decode: 1 to {MAX_TOKENS} tokens, got {T}")
    if H != weights.hidden or hidden.dtype != weights.gate_up.dtype:
        raise ValueError(f"block_decode: hidden {tuple(hidden.shape)} {hidden.dtype} against experts of H="
                         f"{weights.hidden} in {weights.gate_up.dtype}")
    if weights.gate_up_bias is not None or weights.down_bias is not None:
        raise ValueError("block_decode: experts with biases take moe_experts.fused_experts")
    act = KERNEL_ACTIVATIONS.get(activation)
    if act is None or act == ACT_CLAMPED_SWIGLU:
        raise ValueError(f"block_decode: activation {activation!r} not supported here")
    routing = router_weight is not None
    if routing == (topk_ids is not None):
        raise ValueError("block_decode: pass either router_weight and spec, or topk_weights and topk_ids")
    if routing:
        if spec is None:
            raise ValueError("block_decode: router_weight needs a RouterSpec")
        check_router(spec, router_weight, H)
        k = spec.top_k
        rw = router_weight.contiguous()
        if not spec.fp32_logits:
            rw = rw.to(hidden.dtype)
        topw = topi = rw  # unused pointers
    else:
        if topk_weights is None or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != T:
            raise ValueError("block_decode: topk_weights and topk_ids must both be [T, k]")
        k = topk_ids.shape[1]
        topw, topi = topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()
        rw, spec = topw, RouterSpec(top_k=k)
    if shared is not None:
        shared.check(H, weights.gate_up.dtype)
    x = hidden.contiguous()
    g_se, g_sn, g_sk, gate_off, up_off, row_mult = weights.gate_up_strides()
    d_se, d_sn, d_sk = weights.down_strides()
    if shared is None:
        n_sh, sh_args, sd = 0, (x, x, 0, 0, 0, None, 0), (x, 0, 0)
    else:
        n_sh, sh_args = shared_args(shared, I)
        sd = (shared.down, shared.down.stride(0), shared.down.stride(1))
    sg = sh_args[5]
    if sms is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    c = tiles or block_tiles(min(E, T * k) + n_sh, H, I, sms)
    acc, cnt = workspace(x.device, T * H)
    out = torch.empty(T, H, device=x.device, dtype=x.dtype)
    grid = (T * k + n_sh, cdiv(I, c.block_i))
    block_e = max(16, next_pow2(E)) if routing else 16
    bias = router_bias.contiguous() if (routing and router_bias is not None) else None

    def launch(t: BlockTiles) -> torch.Tensor:
        fast(block_decode_kernel)[grid](
            x, rw, bias if bias is not None else rw, topw, topi,
            weights.gate_up, weights.down, sh_args[0], sh_args[1], sd[0], sg if sg is not None else x,
            acc, cnt, out,
            T, H, I, E, grid[0] * grid[1], float(spec.scaling),
            x.stride(0), rw.stride(0),
            g_se, g_sn, g_sk, gate_off, up_off, row_mult,
            d_se, d_sn, d_sk,
            sh_args[2], sh_args[3], sh_args[4], sd[1], sd[2], sh_args[6], out.stride(0),
            ROUTE=routing, SCORING=SOFTMAX if spec.scoring == "softmax" else SIGMOID, RENORM=spec.renormalize,
            HAS_RBIAS=bias is not None, FP32_LOGITS=spec.fp32_logits, ROUND_WEIGHTS=routing and round_weights,
            N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, TOP_K=k, ACT=act, N_SHARED=n_sh,
            HAS_SGATE=sg is not None,
            BLOCK_T=MAX_TOKENS, BLOCK_E=block_e, BLOCK_K=next_pow2(k), BLOCK_G=max(2, next_pow2(spec.n_group)),
            BLOCK_RH=max(16, min(128, 8192 // block_e)), BLOCK_I=t.block_i, BLOCK_H=t.block_h, BLOCK_N=t.block_n,
            DOT_F32=INTERPRETED, FP32_PRECISION="ieee", BLOCK_EPI=1024, FENCE=not INTERPRETED, DIAG=diag,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        return out

    fallbacks = (c, BlockTiles(c.block_i, 64, 64, 4, 2), BlockTiles(16, 32, 32, 4, 1))
    return launch_fitting(("block decode", c, H, x.dtype, spec.fp32_logits, block_e), fallbacks, launch)
