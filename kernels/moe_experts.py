"""The MoE experts forward on our Triton kernels: picks the decode GEMV (1-4 tokens), the expert-rows (5-16
tokens, see moe_expert_rows) or the grouped-GEMM path (`decode_path`), the tile configuration for the shape, and
launches with no host synchronisation (CUDA-graph capturable).

Expert biases and GPT-OSS's clamped SwiGLU run on the GEMV and pointer GEMM kernels; the descriptor (TMA)
kernels take neither, so such experts never go there, whatever the tile config asks.
A shared expert (`SharedExpert`) joins the decode paths' launches as extra slots per token (see moe_gemv and
moe_expert_rows); on the grouped path it is a dense MLP over every token, which cuBLAS runs near its peak, added
to the routed sum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.interpreter import INTERPRETED
from kernels.launch import cdiv, fast, launch_fitting, sm_count
from kernels.moe_align import Alignment, align_slots
from kernels.moe_expert_rows import MAX_SLOTS, down_rows_kernel, gate_up_rows_kernel
from kernels.moe_gemv import down_gemv_kernel, gate_up_gemv_kernel, slot_sum_kernel
from kernels.moe_grouped_gemm import (
    ACT_CLAMPED_SWIGLU,
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_RELU,
    ACT_SILU,
    KERNEL_ACTIVATIONS,
    down_kernel,
    gate_up_kernel,
)
from kernels.moe_grouped_tma import down_tma_kernel, gate_up_tma_kernel, tma_layout_ok

# Up to this many tokens the experts run as matrix-vector products, one per slot (see moe_gemv); up to
# ROWS_MAX_TOKENS, each expert's tokens together (see moe_expert_rows); above, as grouped GEMMs.
GEMV_MAX_TOKENS = 4
ROWS_MAX_TOKENS = 16
# The decode kernels' range: up to here a shared expert rides inside them as more slots (hf_shared); above, it is a
# dense matmul on cuBLAS beside the grouped GEMMs.
DECODE_MAX_TOKENS = ROWS_MAX_TOKENS
ROWS_BLOCK_M = 16  # rows of the tensor-core tile: one block holds every token of an expert up to ROWS_MAX_TOKENS


@dataclass(frozen=True)
class ExpertWeights:
    """Expert weights in transformers' layout, addressed by strides (no copies).

    gate_up: [E, 2I, H] (or [E, H, 2I] when transposed); gate rows first (`concatenated`) or alternating
    gate/up rows (interleaved). down: [E, H, I] (or [E, I, H] when transposed).
    gate_up_bias: optional [E, 2I], its columns in gate_up's output-row order (concatenated or interleaved alike);
    down_bias: optional [E, H]. Both or neither; any strides, any float dtype (added in float32).
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    transposed: bool = False
    concatenated: bool = True
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate_up.shape[1 if self.transposed else 2]

    @property
    def intermediate(self) -> int:
        return self.gate_up.shape[2 if self.transposed else 1] // 2

    def gate_up_strides(self) -> tuple[int, int, int, int, int, int]:
        """(stride_e, stride_n, stride_k, gate_off, up_off, row_mult) over output column n and input k."""
        w = self.gate_up
        se, sn, sk = (w.stride(0), w.stride(2), w.stride(1)) if self.transposed else (w.stride(0), w.stride(1),
                                                                                      w.stride(2))
        if self.concatenated:
            return se, sn, sk, 0, self.intermediate, 1
        return se, sn, sk, 0, 1, 2

    def down_strides(self) -> tuple[int, int, int]:
        """(stride_e, stride_n, stride_k) with n over H and k over I."""
        w = self.down
        return (w.stride(0), w.stride(2), w.stride(1)) if self.transposed else (w.stride(0), w.stride(1), w.stride(2))

    def check_biases(self) -> None:
        """Raise ValueError unless the biases are absent, or both present with shapes [E, 2I] and [E, H]."""
        gb, db = self.gate_up_bias, self.down_bias
        if gb is None and db is None:
            return
        E, H, I = self.num_experts, self.hidden, self.intermediate
        if gb is None or db is None or tuple(gb.shape) != (E, 2 * I) or tuple(db.shape) != (E, H):
            raise ValueError(f"ExpertWeights: biases must be both None or [E, 2I] = {(E, 2 * I)} and [E, H] = "
                             f"{(E, H)}; got {None if gb is None else tuple(gb.shape)} and "
                             f"{None if db is None else tuple(db.shape)}")


@dataclass(frozen=True)
class SharedExpert:
    """A shared expert: an MLP every token goes through with weight 1, beside its routed experts (DeepSeek's
    `shared_experts`, Qwen2-MoE's `shared_expert`), in nn.Linear's layout, addressed by strides (no copies).

    gate, up: [Is, H]; down: [H, Is]; gate_weight: optional sigmoid gate [1, H] or [H] (Qwen2-MoE's
    `shared_expert_gate`): the output is then sigmoid(x . gate_weight) * down(act(gate x) * up x). No biases; the
    activation is the routed experts' (one of moe_grouped_gemm.ACTIVATIONS); all in the routed weights' dtype.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_weight: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def check(self, hidden: int, dtype: torch.dtype) -> None:
        """Raise ValueError unless the shapes agree with hidden size `hidden` and every weight is of `dtype`."""
        Is = self.width
        gw = self.gate_weight
        shapes_ok = (tuple(self.gate.shape) == (Is, hidden) and tuple(self.up.shape) == (Is, hidden)
                     and tuple(self.down.shape) == (hidden, Is) and (gw is None or gw.numel() == hidden))
        dtypes_ok = all(t.dtype == dtype for t in (self.gate, self.up, self.down) + (() if gw is None else (gw,)))
        if not shapes_ok or not dtypes_ok:
            got = [(tuple(t.shape), str(t.dtype)) for t in (self.gate, self.up, self.down, gw) if t is not None]
            raise ValueError(f"SharedExpert: want gate/up [Is, H], down [H, Is], gate_weight [1, H] with H = "
                             f"{hidden}, all {dtype}; got {got}")

    def dense(self, x: torch.Tensor, act: int) -> torch.Tensor:
        """The shared expert on every row of x [T, H] with torch's matmuls (act: an ACT_* code): [T, H]."""
        y = F.linear(_TORCH_ACTS[act](F.linear(x, self.gate)) * F.linear(x, self.up), self.down)
        if self.gate_weight is not None:
            y = torch.sigmoid(F.linear(x, self.gate_weight.reshape(1, -1))) * y
        return y


_TORCH_ACTS = {ACT_SILU: F.silu, ACT_GELU_TANH: lambda g: F.gelu(g, approximate="tanh"), ACT_GELU: F.gelu,
               ACT_RELU: F.relu}


def _bias_args(bias: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    # (pointer, stride over experts, stride over columns) for a kernel's bias operand; (None, 0, 0) without one,
    # which HAS_BIAS=False never reads.
    return (None, 0, 0) if bias is None else (bias, bias.stride(0), bias.stride(1))


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    per_slot: bool = False  # down GEMM only: per-slot stores + a sum over k instead of float32 atomics
    tma: bool = False  # operands through tensor descriptors (moe_grouped_tma) where the layout allows
    programs_per_sm: int = 0  # tma only: a persistent grid of this many programs per SM; 0: one per tile
    flatten: bool = False  # tma + persistent only: let Triton pipeline across consecutive tiles of a program


@dataclass(frozen=True)
class GemvConfig:
    """Decode path: output columns per program, input elements per step, warps (see moe_gemv)."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    groups: int = 0  # down only: slot groups per token; 0: down_groups decides


@dataclass(frozen=True)
class RowsConfig:
    """The expert-rows path (moe_expert_rows): output columns per program, input elements per step, warps,
    software-pipeline stages."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=None)  # asked at every decode call: the answer depends on these ints alone
def rows_tiles(hidden: int, width: int, experts: int, transposed: bool = False,
               sms: int = 132) -> tuple[RowsConfig, RowsConfig]:
    """(gate/up, down) tiles of the expert-rows path for hidden size H = `hidden`, expert width I = `width` and
    `experts` experts read at most (min(E, T * k) plus shared-expert chunks), on a GPU of `sms` multiprocessors.

    Measured on one H200 as graph replays (bench/results/decode_paths_h200.csv: 8 layouts, uniform routing, 8 and
    16 tokens, one tile for both kernels; decode_paths_down_h200.csv: the grid's narrow layouts at 16 tokens, down
    tiles beside the best common one). Wider column tiles give each program more of an expert's weights in
    flight, as long as there are programs for every SM: gate/up 64 columns x 64-wide steps where experts x I / 64
    covers two waves of SMs (Qwen3 at 16 tokens 205 against 226 us), else 32 x 128 (the top-1 32-expert layer,
    about 16 experts x 8 tiles of 64: 32 x 128 was 12% faster) or, from H = 4096, 32 x 256 (Mixtral: 3% faster
    than 128, 16-column tiles 20-45% slower); down 128 x 128 where I <= 1024 and experts x H / 128 covers the
    SMs once (Qwen3 200 against 205 us with 64-column down, 256 x 3072 x 256 132 against 138, the top-1 layer
    29.0 against 32.2 on 32 columns), else as gate/up by I. Transposed weights (GPT-OSS's [E, H, 2I]) have a
    tile's columns adjacent in memory: 64 x 64 (369 us at 16 tokens where 32 x 128 took 570)."""
    if transposed:
        return RowsConfig(64, 64, 4, 3), RowsConfig(64, 64, 4, 3)

    def narrow(k_dim: int) -> RowsConfig:
        return RowsConfig(32, 256 if k_dim >= 4096 else 128, 4, 3)

    gate_up = (RowsConfig(64, 64, 4, 3) if hidden < 4096 and experts * cdiv(width, 64) >= 2 * sms
               else narrow(hidden))
    down = (RowsConfig(128, 128, 4, 3) if width <= 1024 and experts * cdiv(hidden, 128) >= sms
            else narrow(width))
    return gate_up, down


def decode_path(tokens: int, top_k: int, dtype: torch.dtype, transposed: bool = False) -> str:
    """The path fused_experts takes: "gemv", "rows" or "grouped".

    Up to GEMV_MAX_TOKENS the per-slot GEMV. Up to ROWS_MAX_TOKENS, when the ids fit one load (MAX_SLOTS) and the
    matmuls are half precision (float32 would run as TF32 on the tensor cores), the expert rows, which read each
    expert routed to once. Under uniform routing with few slots per expert the per-slot GEMV read as fast or
    faster (8 tokens, bench/results/decode_paths_h200.csv: Qwen3 131 against 147 us, DeepSeek-V3 1161 against
    1217), but a model's router repeats experts far more: a 384-expert top-8 layer at 16 tokens took 865 us on
    the GEMV against 595 on the grouped GEMMs in the grid (bench/results/moe_grid_h200_t16.csv). Transposed
    weights (GPT-OSS's [E, H, 2I]) take the rows from one token: the GEMV's 16-column tiles read 32 bytes of each
    row, the rows' 64 columns 128 (GPT-OSS's layout at 1 / 2 / 4 tokens: 63 / 90 / 182 us against 99 / 172 / 303,
    bench/results/decode_paths_small_h200.csv). Else the grouped GEMMs (GPT-OSS's biases keep those off the
    descriptor kernels, and the pointer kernels took 1.6 ms on its transposed weights at 16 tokens)."""
    if tokens <= GEMV_MAX_TOKENS and not transposed:
        return "gemv"
    if tokens > ROWS_MAX_TOKENS or tokens * top_k > MAX_SLOTS or dtype not in (torch.bfloat16, torch.float16):
        return "gemv" if tokens <= GEMV_MAX_TOKENS else "grouped"
    return "rows"


# Narrow column tiles, long rows: enough programs to cover every SM, 16 KiB+ in flight per program.
GEMV_DEFAULT = GemvConfig()


# (gate/up, down) tiles of the decode path. The first sweep (bench/results/launch_overhead_h200.csv) timed graphs
# of one call, whose launch hid differences under 5-18 us; timed inside graphs of many calls over copies of the
# weights (one H200, 9 layers x 1 and 4 tokens, bench/results/probes/decode_probe_tiles_h200.log), 4 columns x
# 1024-wide steps over 4 warps was the best gate/up tile or within 3% of it on 17 of the 18 points (up to 40% faster
# than 16 x 512 on small layers: top-1 32 x 2048 x 512, 15.3 -> 9.3 us), and, with a program per slot, the down
# tile within 3% of the best on 17 of 18 (the top-1 layer at 1 token: 7.1 against 6.5 us).
GEMV_TILES = (GemvConfig(4, 1024, 4), GemvConfig(4, 1024, 4))
# Transposed weights (GPT-OSS's [E, H, 2I] / [E, I, H]): a tile's columns are then adjacent elements of each
# weight row, so 4 of them load 8 bytes where 16 load 32. The grid had GPT-OSS-20B at 1 token go from 131 to 176 us
# with the 4-column tiles (bench/results/moe_grid_h200_gptoss_narrow_tiles.csv), so it keeps 16 columns; its down
# GEMV in two slot groups took 97 us at 1 token against 116 in one and 102 in four (bench/results/
# decode_sweep_h200.csv; 4 tokens: 299 against 317 and 305).
GEMV_TILES_TRANSPOSED = (GemvConfig(16, 512, 4), GemvConfig(16, 1024, 8, groups=2))


# Down at decode sizes: one program per (token, column tile) walked the token's slots one after another, so every
# program waited on k round trips to memory, and a layer with few column tiles (H = 2048: 128 programs of 16
# columns) left SMs idle. Now each slot has its own programs, which write float32 partial sums that a second, tiny
# kernel adds in slot order (no atomics: the same output at every call). One H200, graph replays of the experts on
# 9 layers x 1 and 4 tokens, 4 tiles x 1-8 slot groups (bench/results/probes/decode_probe_tiles_h200.log): one
# group per slot was the best or within 3% of it on 17 of 18 points; one group for all slots lost up to 19%
# (GPT-OSS's shape, untransposed, at 1 token: 65 against 55 us).
SLOT_SUM_BLOCK = 1024


@lru_cache(maxsize=None)  # asked twice at every decode call, where the host's time is the call's time
def fit_k(tile: GemvConfig | RowsConfig, k_dim: int) -> GemvConfig | RowsConfig:
    """tile with its step over the input (block_k) no wider than k_dim rounded up to a power of two (at least 32).
    A 1024-wide step over a 256-wide expert row masks three quarters of every load; real layers change only in the
    decode GEMV's down step over experts 256-512 wide, and the interpreter runs the tests' 16-56-wide experts up to
    32x faster."""
    width = max(32, 1 << max(0, k_dim - 1).bit_length())
    return tile if tile.block_k <= width else dataclasses.replace(tile, block_k=width)


def down_groups(slots: int) -> int:
    """Slot groups per token for the decode down GEMV: one per slot (routed experts plus shared-expert chunks)."""
    return max(1, slots)


@lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    # Tensor descriptors are bulk copies on Hopper and later (compute capability 9+); older GPUs take the pointer
    # kernels, which were tuned there. The interpreter runs both.
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _programs(c: TileConfig, capacity_tiles: int, device: torch.device) -> int:
    """Grid size of a TMA kernel: persistent (programs_per_sm per SM) or one program per capacity tile."""
    if c.programs_per_sm <= 0:
        return capacity_tiles
    return max(1, min(capacity_tiles, c.programs_per_sm * sm_count(device)))


def pick_configs(tokens: int, top_k: int, num_experts: int) -> tuple[TileConfig, TileConfig]:
    """Tile configs for (gate/up, down) from the mean rows per expert (T*k/E).

    Up to 128 rows per expert: from the H100 sweep in bench/results/moe_sweep_h100.csv (`python -m bench.moe_layer
    --sweep`), the best config of each shape at T = 256 by mean rows per expert. Above: 128-row tiles through
    tensor descriptors, from the H200 runs of `python -m bench.moe_gemm` (bench/results/moe_gemm_h200*.csv): at
    256 rows per expert (Qwen3 at T=4096, Mixtral at 1024) they beat the 64-row pointer tiles by 13-25% on both
    GEMMs. Gate/up one program per tile with three stages; down persistent and flattened (its short K loop gains
    most from overlapping one tile's stores with the next tile's loads), per-slot stores and a sum over k."""
    rows_per_expert = tokens * top_k / num_experts
    if rows_per_expert > 2048:
        # A few experts with thousands of rows each (Mixtral at T=16384: 4096): dense-like GEMMs, where both GEMMs
        # in a persistent grid without flattening were the fastest in every run (gate/up 12.3-12.4 ms against
        # 12.6-13.8 per tile; down 5.8-6.2 against 6.0-6.2 flattened).
        return (TileConfig(128, 128, 64, 8, 8, 3, tma=True, programs_per_sm=1),
                TileConfig(128, 256, 64, 8, 8, 3, per_slot=True, tma=True, programs_per_sm=1))
    if rows_per_expert <= 8:
        return TileConfig(16, 64, 128, 1, 4, 4), TileConfig(16, 64, 128, 1, 4, 4)
    if rows_per_expert <= 48:
        return TileConfig(32, 64, 64, 8, 8, 4), TileConfig(32, 128, 64, 8, 4, 4, per_slot=True)
    if rows_per_expert <= 128:
        return TileConfig(64, 64, 64, 8, 4, 4), TileConfig(64, 128, 64, 8, 8, 3)
    return (TileConfig(128, 128, 64, 8, 8, 3, tma=True),
            TileConfig(128, 256, 64, 8, 8, 3, per_slot=True, tma=True, programs_per_sm=1, flatten=True))


def fused_experts(
    hidden: torch.Tensor,
    weights: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    configs: tuple[TileConfig, TileConfig] | None = None,
    force_path: str | None = None,
    gemv: tuple[GemvConfig, GemvConfig] | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    shared: SharedExpert | None = None,
    rows: tuple[RowsConfig, RowsConfig] | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * (Down_e(act(Gate_e x_t + bg_e) * (Up_e x_t + bu_e)) + bd_e), e = topk_ids[t, j];
    the biases (weights.gate_up_bias [E, 2I], weights.down_bias [E, H]) are 0 when absent. With `shared`, plus
    the shared expert's output on x_t (its gate and activation as SharedExpert says; not with "clamped_swiglu").

    hidden: [T, H] bf16/fp16/fp32; topk_weights: [T, k] (any float dtype); topk_ids: [T, k] int.
    Returns [T, H] in hidden's dtype. activation: a `hidden_act` name of moe_grouped_gemm.ACTIVATIONS, or
    "clamped_swiglu" (GPT-OSS: act(g) * u = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),
    g' = min(g, limit), with alpha = swiglu_alpha and limit = swiglu_limit; the other activations ignore both).
    force_path: "gemv", "rows" or "grouped" (tests, benchmarks; default: decode_path); configs: (gate/up, down)
    tiles of the grouped path, gemv: of the decode GEMV, rows: of the expert-rows path (default: pick_configs,
    GEMV_TILES or GEMV_TILES_TRANSPOSED, rows_tiles).
    """
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"fused_experts: activation {activation!r} not supported; one of "
                         f"{sorted(KERNEL_ACTIVATIONS)}")
    if weights.gate_up_bias is not None or weights.down_bias is not None:
        weights.check_biases()  # unbiased experts skip even this call
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, I = weights.num_experts, weights.intermediate
    if H != weights.hidden or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != T:
        raise ValueError(f"fused_experts: hidden {tuple(hidden.shape)}, experts H={weights.hidden}, "
                         f"topk {tuple(topk_weights.shape)}/{tuple(topk_ids.shape)} do not agree")
    act = KERNEL_ACTIVATIONS[activation]
    if shared is not None:
        if act not in _TORCH_ACTS:
            raise ValueError(f"fused_experts: a shared expert with activation {activation!r} is not supported")
        shared.check(H, weights.gate_up.dtype)
    alpha, limit = float(swiglu_alpha), float(swiglu_limit)
    x = hidden.contiguous()
    ids = topk_ids.to(torch.int32).contiguous()
    topw = topk_weights.contiguous()
    out_dtype = hidden.dtype
    if T == 0:
        return torch.empty_like(x)
    path = force_path or decode_path(T, k, weights.gate_up.dtype, weights.transposed)
    if path == "rows" and T * k > MAX_SLOTS:
        raise ValueError(f"fused_experts: the rows path takes at most {MAX_SLOTS} slots; got {T} x {k}")

    if path == "rows":
        return _rows_path(x, weights, ids, topw, act, alpha, limit, shared, rows, out_dtype)

    if path == "gemv":
        g_se, g_sn, g_sk, gate_off, up_off, row_mult = weights.gate_up_strides()
        d_se, d_sn, d_sk = weights.down_strides()
        gu, gd = gemv or (GEMV_TILES_TRANSPOSED if weights.transposed else GEMV_TILES)
        gu, gd = fit_k(gu, H), fit_k(gd, I)
        n_sh, sh = (0, (None, None, 0, 0, 0, None, 0)) if shared is None else _shared_args(shared, I)
        slots = k + n_sh
        inter = torch.empty(T * slots, I, device=x.device, dtype=out_dtype)
        fast(gate_up_gemv_kernel)[(T * slots, cdiv(I, gu.block_n))](
            x, weights.gate_up, ids, inter, H, I, x.stride(0), g_se, g_sn, g_sk, inter.stride(0),
            gate_off, up_off, row_mult, *_bias_args(weights.gate_up_bias), alpha, limit, *sh,
            TOP_K=k, ACT=act, HAS_BIAS=weights.gate_up_bias is not None, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k,
            N_SHARED=n_sh, HAS_SGATE=sh[5] is not None, num_warps=gu.num_warps)
        out = torch.empty(T, H, device=x.device, dtype=out_dtype)
        sd = (None, 0, 0, 0) if shared is None else (shared.down, shared.down.stride(0), shared.down.stride(1),
                                                     shared.width)
        groups = min(gd.groups or down_groups(slots), slots)  # never a group without a slot
        part = out if groups == 1 else torch.empty(T, groups, H, device=x.device, dtype=torch.float32)
        fast(down_gemv_kernel)[(T * groups, cdiv(H, gd.block_n))](
            inter, weights.down, ids, topw, part, I, H, inter.stride(0), d_se, d_sn, d_sk, out.stride(0),
            *_bias_args(weights.down_bias), *sd,
            TOP_K=k, HAS_BIAS=weights.down_bias is not None, BLOCK_N=gd.block_n, BLOCK_K=gd.block_k,
            N_SHARED=n_sh, GROUPS=groups, num_warps=gd.num_warps)
        if groups > 1:
            fast(slot_sum_kernel)[(T, cdiv(H, SLOT_SUM_BLOCK))](part, out, H, out.stride(0), GROUPS=groups,
                                                                BLOCK_N=SLOT_SUM_BLOCK, num_warps=4)
        return out

    if shared is not None:  # a dense MLP over every token: cuBLAS, then the routed sum added to it
        routed = fused_experts(hidden, weights, topk_weights, topk_ids, activation, configs, force_path, gemv,
                               swiglu_alpha, swiglu_limit)
        return routed.add_(shared.dense(x.to(weights.gate_up.dtype), act).to(out_dtype))

    def launch(pair: tuple[TileConfig, TileConfig]) -> torch.Tensor:
        cfg_up, cfg_down = pair
        # Both GEMMs walk the same alignment, so they share one BLOCK_M.
        if cfg_up.block_m != cfg_down.block_m:
            raise ValueError("fused_experts: gate/up and down tile configs must share block_m")
        al = align_slots(ids, E, cfg_up.block_m)
        inter = grouped_gate_up(x, weights, al, k, act, cfg_up, alpha, limit)
        return grouped_down(inter, weights, al, topw, T, k, cfg_down)

    if configs is not None:
        return launch(configs)
    choice = pick_configs(T, k, E)
    # The heuristic's tiles, then ones that need less shared memory, should a shape (a wide H or I, fp32) not
    # fit this GPU with them. What fits is remembered per key, and biases (both or neither: check_biases) or the
    # clamped gate send a TMA choice to the pointer kernels, which need other resources: both are in the key.
    fit_key = (choice, H, I, x.dtype, weights.gate_up.dtype, act, weights.gate_up_bias is None)
    return launch_fitting(fit_key, grouped_fallbacks(choice), launch)


def _rows_path(x: torch.Tensor, weights: ExpertWeights, ids: torch.Tensor, topw: torch.Tensor, act: int,
               alpha: float, limit: float, shared: SharedExpert | None,
               tiles: tuple[RowsConfig, RowsConfig] | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fused_experts on the expert-rows kernels: x [T, H], ids [T, k] int32, topw [T, k], all contiguous.
    Returns [T, H] in out_dtype."""
    T, H = x.shape
    k = ids.shape[1]
    I = weights.intermediate
    g_se, g_sn, g_sk, gate_off, up_off, row_mult = weights.gate_up_strides()
    d_se, d_sn, d_sk = weights.down_strides()
    n_sh, sh = (0, (None, None, 0, 0, 0, None, 0)) if shared is None else _shared_args(shared, I)
    gu, gd = tiles or rows_tiles(H, I, min(weights.num_experts, T * k) + n_sh, weights.transposed, sm_count(x.device))
    gu, gd = fit_k(gu, H), fit_k(gd, I)
    slots = k + n_sh
    block_s = max(16, 1 << (T * k - 1).bit_length())
    inter = torch.empty(T * slots, I, device=x.device, dtype=out_dtype)
    fast(gate_up_rows_kernel)[(T * k + n_sh, cdiv(I, gu.block_n))](
        x, weights.gate_up, ids, inter, T * k, T, H, I, x.stride(0), g_se, g_sn, g_sk, inter.stride(0),
        gate_off, up_off, row_mult, *_bias_args(weights.gate_up_bias), alpha, limit, *sh,
        TOP_K=k, ACT=act, HAS_BIAS=weights.gate_up_bias is not None, BLOCK_M=ROWS_BLOCK_M, BLOCK_N=gu.block_n,
        BLOCK_K=gu.block_k, BLOCK_S=block_s, DOT_F32=INTERPRETED, N_SHARED=n_sh, HAS_SGATE=sh[5] is not None,
        PAIRED=(row_mult, gate_off, up_off, g_sn) == (2, 0, 1, 1), num_warps=gu.num_warps, num_stages=gu.num_stages)
    part = torch.empty(T, slots, H, device=x.device, dtype=torch.float32)
    sd = (None, 0, 0, 0) if shared is None else (shared.down, shared.down.stride(0), shared.down.stride(1),
                                                 shared.width)
    fast(down_rows_kernel)[(T * k + n_sh, cdiv(H, gd.block_n))](
        inter, weights.down, ids, topw, part, T * k, T, I, H, inter.stride(0), d_se, d_sn, d_sk,
        *_bias_args(weights.down_bias), *sd,
        TOP_K=k, HAS_BIAS=weights.down_bias is not None, BLOCK_M=ROWS_BLOCK_M, BLOCK_N=gd.block_n,
        BLOCK_K=gd.block_k, BLOCK_S=block_s, DOT_F32=INTERPRETED, N_SHARED=n_sh,
        num_warps=gd.num_warps, num_stages=gd.num_stages)
    out = torch.empty(T, H, device=x.device, dtype=out_dtype)
    fast(slot_sum_kernel)[(T, cdiv(H, SLOT_SUM_BLOCK))](part, out, H, out.stride(0), GROUPS=slots,
                                                        BLOCK_N=SLOT_SUM_BLOCK, num_warps=4)
    return out


def _shared_args(shared: SharedExpert, width: int) -> tuple[int, tuple]:
    """(chunks of the routed `width`, the gate/up GEMV kernel's shared-expert arguments)."""
    g, u, gw = shared.gate, shared.up, shared.gate_weight
    if g.stride() != u.stride():  # one pair of strides addresses both (nn.Linear weights always share them)
        g, u = g.contiguous(), u.contiguous()
    gw_args = (None, 0) if gw is None else (gw.reshape(-1), gw.reshape(-1).stride(0))
    return cdiv(shared.width, width), (g, u, g.stride(0), g.stride(1), shared.width, *gw_args)


@lru_cache(maxsize=None)
def grouped_fallbacks(choice: tuple[TileConfig, TileConfig]) -> tuple[tuple[TileConfig, TileConfig], ...]:
    """`choice`, then the same tiles with two stages, then 64-row tiles of K step 32 on the pointer kernels, then
    the smallest tiles (16 rows, two stages): each needs less shared memory than the one before."""
    up, down = choice
    fewer = tuple(dataclasses.replace(c, num_stages=min(c.num_stages, 2)) for c in choice)
    mid = (TileConfig(64, 64, 32, 8, 4, 2), TileConfig(64, 64, 32, 8, 4, 2))
    small = (TileConfig(16, 64, 64, 1, 4, 2), TileConfig(16, 64, 64, 1, 4, 2))
    out: list[tuple[TileConfig, TileConfig]] = []
    for pair in (choice, fewer, mid, small):
        if pair not in out:
            out.append(pair)  # type: ignore[arg-type]
    return tuple(out)  # cached: every grouped launch asks, and the answer depends on the choice alone


def grouped_gate_up(x: torch.Tensor, weights: ExpertWeights, al: Alignment, k: int, act: int,
                    c: TileConfig, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The gate/up grouped GEMM with the gate/up bias (if weights have one) and the gated activation (act: a
    moe_grouped_gemm ACT_* code; alpha, limit: ACT_CLAMPED_SWIGLU's): x [T, H], al from align_slots(ids [T, k])
    with c.block_m. Returns the activation [P, I] in x's dtype, rows in al's sorted order (padding rows
    unwritten)."""
    T, H = x.shape
    E, I = weights.num_experts, weights.intermediate
    P = al.sorted_slots.numel()
    inter = torch.empty(P, I, device=x.device, dtype=x.dtype)
    # The descriptor kernel takes no bias and no clamped-gate parameters: such experts take the pointer kernel.
    if (c.tma and weights.gate_up_bias is None and act != ACT_CLAMPED_SWIGLU and x.dtype == weights.gate_up.dtype
            and _has_tma(x.device)
            and tma_layout_ok(weights.gate_up, weights.down, weights.transposed, weights.concatenated)):
        n = _programs(c, P // c.block_m * cdiv(I, c.block_n), x.device)
        w_desc = TensorDescriptor(weights.gate_up.view(E * 2 * I, H), [E * 2 * I, H], [H, 1], [c.block_n, c.block_k])
        fast(gate_up_tma_kernel)[(n,)](
            x, w_desc, inter, al.sorted_slots, al.block_expert, al.num_padded,
            T * k, H, I, 2 * I, I, n, x.stride(0), inter.stride(0),
            TOP_K=k, ACT=act, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
            EVEN_K=H % c.block_k == 0, DOT_F32=INTERPRETED, FLATTEN=c.flatten and c.programs_per_sm > 0,
            num_warps=c.num_warps, num_stages=c.num_stages)
        return inter
    g_se, g_sn, g_sk, gate_off, up_off, row_mult = weights.gate_up_strides()
    fast(gate_up_kernel)[(P // c.block_m * cdiv(I, c.block_n),)](
        x, weights.gate_up, inter, al.sorted_slots, al.block_expert, al.num_padded,
        T * k, P, H, I, x.stride(0), g_se, g_sn, g_sk, inter.stride(0), gate_off, up_off, row_mult,
        *_bias_args(weights.gate_up_bias), alpha, limit,
        TOP_K=k, ACT=act, HAS_BIAS=weights.gate_up_bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, GROUP_M=c.group_m, EVEN_K=H % c.block_k == 0, DOT_F32=INTERPRETED,
        PAIRED=(row_mult, gate_off, up_off, g_sn) == (2, 0, 1, 1), num_warps=c.num_warps, num_stages=c.num_stages)
    return inter


def grouped_down(inter: torch.Tensor, weights: ExpertWeights, al: Alignment, topw: torch.Tensor, T: int, k: int,
                 c: TileConfig) -> torch.Tensor:
    """The down grouped GEMM with the down bias (if weights have one), the routing weight and the sum over k:
    inter [P, I] from grouped_gate_up, topw [T, k] contiguous. Returns [T, H] in inter's dtype."""
    E, H, I = weights.num_experts, weights.hidden, weights.intermediate
    P = inter.shape[0]
    per_slot = c.per_slot and k > 1
    if per_slot:
        acc = torch.empty(T * k, H, device=inter.device, dtype=inter.dtype)
    else:
        # k == 1 stores each row once (no atomics), straight in the output dtype.
        acc = (torch.zeros(T, H, device=inter.device, dtype=torch.float32) if k > 1
               else torch.empty(T, H, device=inter.device, dtype=inter.dtype))
    # The descriptor kernel takes no bias: biased experts take the pointer kernel.
    if (c.tma and weights.down_bias is None and inter.dtype == weights.down.dtype and _has_tma(inter.device)
            and tma_layout_ok(weights.gate_up, weights.down, weights.transposed, weights.concatenated)):
        n = _programs(c, P // c.block_m * cdiv(H, c.block_n), inter.device)
        a_desc = TensorDescriptor(inter, [P, I], [inter.stride(0), 1], [c.block_m, c.block_k])
        w_desc = TensorDescriptor(weights.down.view(E * H, I), [E * H, I], [I, 1], [c.block_n, c.block_k])
        fast(down_tma_kernel)[(n,)](
            a_desc, w_desc, acc, topw, al.sorted_slots, al.block_expert, al.num_padded,
            T * k, I, H, n, acc.stride(0),
            TOP_K=k, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
            DOT_F32=INTERPRETED, PER_SLOT=per_slot, FLATTEN=c.flatten and c.programs_per_sm > 0,
            num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        d_se, d_sn, d_sk = weights.down_strides()
        fast(down_kernel)[(P // c.block_m * cdiv(H, c.block_n),)](
            inter, weights.down, acc, topw, al.sorted_slots, al.block_expert, al.num_padded,
            T * k, P, I, H, inter.stride(0), d_se, d_sn, d_sk, acc.stride(0),
            *_bias_args(weights.down_bias),
            TOP_K=k, HAS_BIAS=weights.down_bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            BLOCK_K=c.block_k, GROUP_M=c.group_m, EVEN_K=I % c.block_k == 0, DOT_F32=INTERPRETED, PER_SLOT=per_slot,
            num_warps=c.num_warps, num_stages=c.num_stages)
    if per_slot:
        return acc.view(T, k, H).sum(dim=1)  # float32 accumulation inside, one launch
    return acc.to(inter.dtype) if k > 1 else acc
