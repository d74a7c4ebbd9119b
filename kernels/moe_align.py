"""Token-to-expert alignment on the device, with no host synchronisation.

The grouped GEMMs walk the (token, k) slots expert by expert in tiles of BLOCK_M rows, and each tile must hold
one expert only. So every expert's slot list is padded up to a multiple of BLOCK_M. The number of padded rows
depends on the routing, which lives on the GPU; reading it back would stall the stream (and break CUDA graph
capture). Instead the buffers are sized for the worst case, `T*k + E*(BLOCK_M-1)` rows, and the kernels read
the true count from device memory and return early past it.

Outputs (P = padded capacity, NB = P / BLOCK_M):
- sorted_slots [P] int32: slot ids (t*k + j) grouped by expert, padding rows hold the sentinel T*k;
- block_expert [NB] int32: the expert of each tile (-1 past the end);
- num_padded [1] int32: rows in use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.launch import fast

# Small routings (decode, small batches; launch count dominates there) are aligned by a single program in one
# launch, which holds a [slots, experts] one-hot in registers: cap its size.
SINGLE_PROGRAM_MAX_ELEMENTS = 16384


class Alignment(NamedTuple):
    sorted_slots: torch.Tensor  # [P] int32
    block_expert: torch.Tensor  # [P // block_m] int32
    num_padded: torch.Tensor  # [1] int32
    block_m: int


def padded_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case padded rows: every expert may need up to BLOCK_M-1 rows of padding."""
    return triton.cdiv(num_slots + num_experts * (block_m - 1), block_m) * block_m


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, N, E, P,
                        BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    # One program: one-hot [N, E] of the slots, counts and in-expert ranks from it (deterministic order).
    n = tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + n, mask=n < N, other=BLOCK_E)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)
    counts = tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1), axis=1)
    pos = tl.sum(onehot * starts[None, :], axis=1) + rank
    tl.store(sorted_ptr + pos, n, mask=n < N)
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    # Padding rows: positions past an expert's real slots. Disjoint from the stores above: no barrier needed.
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        owner = tl.sum((ends[None, :] <= p[:, None]).to(tl.int32), axis=1)  # expert whose range holds p
        own = owner[:, None] == e[None, :]
        own_start = tl.sum(tl.where(own, starts[None, :], 0), axis=1)
        own_count = tl.sum(tl.where(own, counts[None, :], 0), axis=1)
        is_pad = (p - own_start >= own_count) | (p >= total)
        tl.store(sorted_ptr + p, N, mask=is_pad & (p < P))
        b = p // BLOCK_M
        first_of_block = (p % BLOCK_M) == 0
        tl.store(block_expert_ptr + b, tl.where(p < total, owner, -1), mask=first_of_block & (p < P))


@triton.jit
def _count_fill_kernel(ids_ptr, counts_ptr, sorted_ptr, N, P, BLOCK: tl.constexpr):
    # Grid over max(N, P): count each slot's expert and fill the sorted buffer with the sentinel N.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=0)
    tl.atomic_add(counts_ptr + ids, 1, mask=offs < N)
    tl.store(sorted_ptr + offs, N, mask=offs < P)


@triton.jit
def _offsets_kernel(counts_ptr, cursor_ptr, block_expert_ptr, num_padded_ptr, E, NB,
                    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    # One program: padded prefix sums, per-expert write cursors, and the expert of every tile.
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(cursor_ptr + e, starts, mask=e < E)
    tl.store(num_padded_ptr, total)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        row = b * BLOCK_M
        owner = tl.sum(((ends[None, :] <= row[:, None]) & (e[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total, owner, -1), mask=b < NB)


@triton.jit
def _scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=0)
    pos = tl.atomic_add(cursor_ptr + ids, 1, mask=offs < N)
    tl.store(sorted_ptr + pos, offs, mask=offs < N)


def align_slots(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Group the routing slots by expert, each expert padded to a multiple of block_m.

    topk_ids: [T, k] int32/int64 expert ids in [0, num_experts). Returns an Alignment (see the module doc).
    Within an expert the slot order is ascending on the single-program path and arbitrary (atomic) otherwise;
    the GEMMs do not depend on it.
    """
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"align_slots: block_m must be a power of two >= 16, got {block_m}")
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    n = ids.numel()
    p = padded_capacity(n, num_experts, block_m)
    nb = p // block_m
    dev = ids.device
    sorted_slots = torch.empty(p, device=dev, dtype=torch.int32)
    block_expert = torch.empty(nb, device=dev, dtype=torch.int32)
    num_padded = torch.empty(1, device=dev, dtype=torch.int32)
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_n = max(16, triton.next_power_of_2(n))
    if block_n * block_e <= SINGLE_PROGRAM_MAX_ELEMENTS:
        fast(_align_small_kernel)[(1,)](ids, sorted_slots, block_expert, num_padded, n, num_experts, p,
                                        BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_P=64, num_warps=8)
        return Alignment(sorted_slots, block_expert, num_padded, block_m)
    counts = torch.zeros(num_experts, device=dev, dtype=torch.int32)
    cursor = torch.empty(num_experts, device=dev, dtype=torch.int32)
    block = 1024
    fast(_count_fill_kernel)[(triton.cdiv(max(n, p), block),)](ids, counts, sorted_slots, n, p, BLOCK=block)
    fast(_offsets_kernel)[(1,)](counts, cursor, block_expert, num_padded, num_experts, nb,
                                BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_B=64)
    fast(_scatter_kernel)[(triton.cdiv(n, block),)](ids, cursor, sorted_slots, n, BLOCK=block)
    return Alignment(sorted_slots, block_expert, num_padded, block_m)
