"""Grouped GEMMs of the MoE experts with their tiles fed by tensor descriptors (TMA on Hopper), optionally in a
persistent grid.

The math and the epilogues are those of `moe_grouped_gemm` (gated activation fused into gate/up; routing weight
and the sum over k fused into down). What differs is how the operands arrive:
- the expert weights, and in down the expert-sorted activation rows, are read through tensor descriptors: on
  Hopper each [BLOCK_N, BLOCK_K] tile is one bulk copy by the tensor memory accelerator, with no per-thread
  address arithmetic and no registers spent on it (the pointer kernels compute and mask 8-16K addresses per step);
- gate/up's token rows are still gathered through pointers (`tok = slot // k`): a row gather by TMA needs
  Blackwell;
- `persistent`: a grid of `programs` programs walks all tiles, the tile count read from device memory, so no
  program is launched only to find its tile past the end, and consecutive tiles of one program can overlap.

Weights must be in transformers' default layout (gate_up [E, 2I, H] with gate rows first, down [E, H, I]), each
expert right after the previous one, 16-byte aligned rows: `tma_layout_ok` says whether they are. The descriptors
view them as 2D [E*2I, H] and [E*H, I]; a column tile that runs past an expert's last row reads the next expert's
rows (or zeros past the tensor's end), and those output columns are masked at the store, so any I and H work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.moe_grouped_gemm import store_down, store_gated, tile_ids, tile_rows


def tma_layout_ok(gate_up: torch.Tensor, down: torch.Tensor, transposed: bool, concatenated: bool) -> bool:
    """Whether `gate_up` [E, 2I, H] and `down` [E, H, I] can be read through 2D tensor descriptors."""
    if transposed or not concatenated or gate_up.dtype not in (torch.bfloat16, torch.float16):
        return False
    if down.dtype != gate_up.dtype:
        return False
    E, N2, H = gate_up.shape
    I = down.shape[2]
    item = gate_up.element_size()
    return (gate_up.stride() == (N2 * H, H, 1) and down.stride() == (H * I, I, 1)
            and (H * item) % 16 == 0 and (I * item) % 16 == 0
            and gate_up.data_ptr() % 16 == 0 and down.data_ptr() % 16 == 0)


@triton.jit
def gate_up_tma_kernel(
    x_ptr, w_desc, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, K, N, rows_per_expert, up_off, num_programs,
    stride_xt, stride_ot,
    TOP_K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, FLATTEN: tl.constexpr,
):
    """out[row, n] = act(x[tok] . Wg[e, n]) * (x[tok] . Wu[e, n]); w_desc views gate_up as [E*2I, H] in
    [BLOCK_N, BLOCK_K] blocks (rows_per_expert = 2I, up_off = I)."""
    num_pid_m = tl.load(num_padded_ptr) // BLOCK_M
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=FLATTEN):
        pid_m, pid_n = tile_ids(tile, num_pid_m, num_pid_n, GROUP_M)
        e, offs_m, slots, valid, offs_n, n_ok = tile_rows(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N,
                                                          BLOCK_M, BLOCK_N)
        tok = (slots // TOP_K).to(tl.int64)
        a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
        row_g = (e * rows_per_expert + pid_n * BLOCK_N).to(tl.int32)
        row_u = row_g + up_off
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=valid[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
            bg = w_desc.load([row_g, k0])  # [BLOCK_N, BLOCK_K]; columns past K arrive as zeros
            bu = w_desc.load([row_u, k0])
            if DOT_F32:
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg.T, acc_g)
            acc_u = tl.dot(a, bu.T, acc_u)
            a_ptrs += BLOCK_K
        store_gated(out_ptr, acc_g, acc_u, offs_m, offs_n, valid, n_ok, stride_ot, ACT)


@triton.jit
def down_tma_kernel(
    a_desc, w_desc, out_ptr, topw_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, K, N, num_programs, stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr, PER_SLOT: tl.constexpr, FLATTEN: tl.constexpr,
):
    """out[tok, n] += w_slot * (a[row] . Wd[e, n]) (float32 atomics), or, PER_SLOT, out[slot, n] = the same
    weighted row for a later sum over k. a_desc views the activation [P, I] in [BLOCK_M, BLOCK_K] blocks, w_desc
    the down weights as [E*H, I] in [BLOCK_N, BLOCK_K] blocks (K = I, N = H). Padding rows of the activation hold
    whatever was in memory: rows do not mix in a matmul, and their outputs are masked at the store."""
    num_pid_m = tl.load(num_padded_ptr) // BLOCK_M
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=FLATTEN):
        pid_m, pid_n = tile_ids(tile, num_pid_m, num_pid_n, GROUP_M)
        e, offs_m, slots, valid, offs_n, n_ok = tile_rows(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N,
                                                          BLOCK_M, BLOCK_N)
        row_a = (pid_m * BLOCK_M).to(tl.int32)
        row_w = (e * N + pid_n * BLOCK_N).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row_a, k0])
            b = w_desc.load([row_w, k0])
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
        store_down(out_ptr, acc, topw_ptr, slots, valid, offs_n, n_ok, stride_ot, TOP_K, PER_SLOT)
