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

from kernels.launch import cdiv, fast, next_pow2

# Small routings (decode, small batches; launch count dominates there) are aligned by a single program in one
# launch, which holds a [slots, experts] one-hot in registers: cap its size.
SINGLE_PROGRAM_MAX_ELEMENTS = 16384
# Larger routings: aim for about this many programs (two per SM of an H100/H200); each takes up to 16 steps.
TARGET_PROGRAMS = 264


class Alignment(NamedTuple):
    sorted_slots: torch.Tensor  # [P] int32
    block_expert: torch.Tensor  # [P // block_m] int32
    num_padded: torch.Tensor  # [1] int32
    block_m: int


def padded_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case padded rows: every expert may need up to BLOCK_M-1 rows of padding."""
    return cdiv(num_slots + num_experts * (block_m - 1), block_m) * block_m


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
def _histogram_kernel(ids_ptr, counts_ptr, sorted_ptr, N, P, per_prog, fill_per_prog,
                      SUB: tl.constexpr, BLOCK_E: tl.constexpr, FILL_BLOCK: tl.constexpr):
    # Program p counts the experts of its slots [p*per_prog, (p+1)*per_prog) into its own row counts[p, :]: no
    # atomics (every slot of a hot expert on one counter serialised in L2: 150 us at 32K slots), and fills its
    # share of the sorted buffer with the sentinel N.
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, per_prog, SUB):
        n = pid * per_prog + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + n, mask=n < N, other=BLOCK_E)  # BLOCK_E matches no expert column
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * BLOCK_E + e, counts)
    for f0 in range(0, fill_per_prog, FILL_BLOCK):
        f = pid * fill_per_prog + f0 + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ptr + f, N, mask=(f < P) & (f0 + tl.arange(0, FILL_BLOCK) < fill_per_prog))


@triton.jit
def _prefix_kernel(counts_ptr, base_ptr, starts_ptr, block_expert_ptr, num_padded_ptr, E, NP, NB,
                   BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    # One program, one pass over counts[NP, E]: each (program, expert)'s first row within its expert (the counts
    # of the programs before it), then the experts' padded starts, the row count in use and every tile's expert.
    # A single program's loads wait on each other: one pass of big chunks keeps that chain short.
    e = tl.arange(0, BLOCK_E)
    r = tl.arange(0, BLOCK_R)
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for r0 in range(0, NP, BLOCK_R):
        rows = r0 + r
        c = tl.load(counts_ptr + rows[:, None] * BLOCK_E + e[None, :], mask=rows[:, None] < NP, other=0)
        tl.store(base_ptr + rows[:, None] * BLOCK_E + e[None, :], tl.cumsum(c, axis=0) - c + running[None, :],
                 mask=rows[:, None] < NP)
        running += tl.sum(c, axis=0)
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + e, ends - padded)
    total_rows = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total_rows)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        row = b * BLOCK_M
        owner = tl.sum(((ends[None, :] <= row[:, None]) & (e[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total_rows, owner, -1), mask=b < NB)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, starts_ptr, sorted_ptr, N, per_prog, SUB: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    # Program p writes its slots at their expert's rows from starts[e] + base[p, e] on, in slot order (ranks by a
    # cumsum over a one-hot tile): deterministic, and no atomics.
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    base = tl.load(starts_ptr + e) + tl.load(base_ptr + pid * BLOCK_E + e)
    for s0 in range(0, per_prog, SUB):
        n = pid * per_prog + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + n, mask=n < N, other=BLOCK_E)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1), axis=1)
        pos = tl.sum(onehot * base[None, :], axis=1) + rank
        tl.store(sorted_ptr + pos, n, mask=n < N)
        base += tl.sum(onehot, axis=0)


def align_slots(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Group the routing slots by expert, each expert padded to a multiple of block_m.

    topk_ids: [T, k] int32/int64 expert ids in [0, num_experts). Returns an Alignment (see the module doc).
    Within an expert the slots are in ascending order (on both paths: the result is deterministic).
    """
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"align_slots: block_m must be a power of two >= 16, got {block_m}")
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    n = ids.numel()
    p = padded_capacity(n, num_experts, block_m)
    nb = p // block_m
    dev = ids.device
    block_e = max(16, next_pow2(num_experts))
    block_n = max(16, next_pow2(n))
    small = block_n * block_e <= SINGLE_PROGRAM_MAX_ELEMENTS
    # Larger routings: a histogram per program, one prefix program, a scatter per program (ranks from the
    # histogram, not from atomics). About two programs per SM, each taking SUB-slot steps over its share.
    sub = max(16, min(256, 8192 // block_e))
    per_prog = sub * max(1, min(16, cdiv(n, sub * TARGET_PROGRAMS)))
    n_prog = cdiv(n, per_prog)
    # One allocation for every buffer (each torch.empty costs host time at decode sizes): sorted slots, tile
    # experts, the row count, and on the large path the per-program counts, first rows and the experts' starts.
    # Offsets stay multiples of 4 elements (16 bytes), as the kernels' pointer specialisation prefers.
    nb4 = cdiv(nb, 4) * 4
    scratch = 0 if small else 2 * n_prog * block_e + block_e
    buf = torch.empty(p + nb4 + 4 + scratch, device=dev, dtype=torch.int32)
    sorted_slots, block_expert, num_padded = buf[:p], buf[p:p + nb], buf[p + nb4:p + nb4 + 1]
    if small:
        fast(_align_small_kernel)[(1,)](ids, sorted_slots, block_expert, num_padded, n, num_experts, p,
                                        BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_P=64, num_warps=8)
        return Alignment(sorted_slots, block_expert, num_padded, block_m)
    o = p + nb4 + 4
    counts, base = buf[o:o + n_prog * block_e], buf[o + n_prog * block_e:o + 2 * n_prog * block_e]
    starts = buf[o + 2 * n_prog * block_e:]
    fill = cdiv(p, n_prog)
    fast(_histogram_kernel)[(n_prog,)](ids, counts, sorted_slots, n, p, per_prog, fill,
                                       SUB=sub, BLOCK_E=block_e, FILL_BLOCK=1024, num_warps=4)
    fast(_prefix_kernel)[(1,)](counts, base, starts, block_expert, num_padded, num_experts, n_prog, nb,
                               BLOCK_E=block_e, BLOCK_R=max(1, 8192 // block_e), BLOCK_M=block_m, BLOCK_B=64,
                               num_warps=16)
    fast(_scatter_kernel)[(n_prog,)](ids, base, starts, sorted_slots, n, per_prog, SUB=sub, BLOCK_E=block_e,
                                     num_warps=4)
    return Alignment(sorted_slots, block_expert, num_padded, block_m)
