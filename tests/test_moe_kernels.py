"""Fused MoE kernels against float64 references: router, alignment, experts (both paths), on odd shapes.

Runs on GPU when there is one, else through the Triton interpreter (TRITON_INTERPRET=1, set by conftest when
no GPU is present) with small sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import moe_align, moe_experts
from kernels.moe_align import align_slots
from kernels.moe_experts import ExpertWeights, SharedExpert, TileConfig, fused_experts
from kernels.moe_grouped_tma import tma_layout_ok
from kernels.moe_router import RouterSpec, route

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def skewed_ids(T: int, E: int, k: int, gen: torch.Generator, skew: float = 1.2, unused: int = 0) -> torch.Tensor:
    """[T, k] distinct expert ids per token, Zipf-like popularity; the last `unused` experts get no tokens."""
    live = E - unused
    pop = 1.0 / torch.arange(1, live + 1, dtype=torch.float64) ** skew
    ids = torch.stack([torch.multinomial(pop, k, replacement=False, generator=gen) for _ in range(T)])
    perm = torch.randperm(live, generator=gen)  # popular experts anywhere, not only at low ids
    return perm[ids].to(torch.int32)


def ref_scores(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None):
    """float64 reference from given logits: (scores [T, E], eligible biased choice scores [T, E], -inf masked)."""
    s = logits.double().softmax(-1) if spec.scoring == "softmax" else logits.double().sigmoid()
    choice = s + (bias.double() if bias is not None else 0)
    if spec.n_group > 1:
        T, E = choice.shape
        g = choice.view(T, spec.n_group, E // spec.n_group).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g).scatter_(1, g.topk(spec.topk_group, dim=-1).indices, 1.0)
        keep = keep.repeat_interleave(E // spec.n_group, dim=1).bool()
        choice = choice.masked_fill(~keep, float("-inf"))
    return s, choice


ROUTER_CASES = [
    ("mixtral E=8 k=2", 8, 2, RouterSpec(top_k=2)),
    ("qwen E=60 k=4 no renorm", 60, 4, RouterSpec(top_k=4, renormalize=False)),
    ("olmoe E=64 k=8", 64, 8, RouterSpec(top_k=8, renormalize=False)),
    ("qwen3 E=128 k=8", 128, 8, RouterSpec(top_k=8)),
    ("deepseek E=64 k=6 grouped", 64, 6,
     RouterSpec(top_k=6, scoring="sigmoid", n_group=8, topk_group=3, scaling=2.5, fp32_logits=True)),
]


@pytest.mark.parametrize("name,E,k,spec", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
@pytest.mark.parametrize("T", [1, 37, 100])
def test_router_matches_reference(name: str, E: int, k: int, spec: RouterSpec, T: int) -> None:
    check_route(name, E, k, spec, T)


def check_route(name: str, E: int, k: int, spec: RouterSpec, T: int,
                tiles: tuple[int, int, int, int] | None = None, split: bool | None = None, H: int = 72,
                gemm: bool | None = None) -> None:
    # H = 72: not a power of two, not a multiple of the K block
    gen = torch.Generator().manual_seed(hash((name, T)) % 2**31)
    dtype = torch.float32 if spec.fp32_logits else torch.bfloat16
    x = torch.randn(T, H, generator=gen).to(DEV, dtype)
    w = (torch.randn(E, H, generator=gen) * 0.2).to(DEV, dtype)
    bias = (torch.randn(E, generator=gen) * 0.05).to(DEV) if spec.scoring == "sigmoid" else None
    logits, topw, topi = route(x, w, spec, bias=bias, tiles=tiles, split=split, gemm=gemm)
    ref_logits = x.double() @ w.double().T
    assert rel_err(logits, ref_logits) < (1e-5 if spec.fp32_logits else 1e-2)
    # Selection and weights, judged on the kernel's own logits. bf16 logits tie often, so the test asks that
    # the chosen experts carry the k best eligible scores (any of tied ones), all distinct.
    s, choice = ref_scores(logits.cpu(), spec, bias.cpu() if bias is not None else None)
    idx = topi.long().cpu()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice"
    got_best = choice.gather(1, idx).sort(-1, descending=True).values
    want_best = choice.topk(k, dim=-1).values
    assert torch.equal(got_best, want_best), f"{name}: not the k best eligible experts"
    wts = s.gather(1, idx)
    if spec.renormalize:
        wts = wts / wts.sum(-1, keepdim=True)
    assert rel_err(topw.cpu(), wts * spec.scaling) < 1e-5


@pytest.mark.parametrize("tiles", [(64, 64, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3)])
def test_router_large_t_tiles(tiles: tuple[int, int, int, int]) -> None:
    """The one-kernel router's tiles for T >= 8192 (where it runs with gemm=False), on a T that leaves the last
    program partly empty."""
    check_route("olmoe large-T tiles", 64, 8, RouterSpec(top_k=8, renormalize=False), 100, tiles, gemm=False)
    check_route("qwen3 large-T tiles", 128, 8, RouterSpec(top_k=8), 100, tiles if tiles[0] <= 32 else None,
                gemm=False)


@pytest.mark.parametrize("name,E,k,spec", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
@pytest.mark.parametrize("T,gemm", [(100, False), (100, True), (3, True)])
def test_router_one_kernel_and_matmul_logits_match_reference(name: str, E: int, k: int, spec: RouterSpec, T: int,
                                                             gemm: bool) -> None:
    """The one-kernel router past decode sizes and the matmul logits at decode sizes, both when asked (the
    built-in choice, gemm_logits, gives the matmul past 64 tokens to routers of a multiple of 16 experts)."""
    check_route(name, E, k, spec, T, gemm=gemm)


def test_gemm_logits_rule() -> None:
    """The matmul logits take over where the split router stops, for expert counts cuBLAS ran faster than our one
    kernel on one H200 (multiples of 16), not for E = 60 or 8 (bench/results/decode_router_gemm_h200.csv)."""
    from kernels.moe_router import SPLIT_MAX_TOKENS, gemm_logits

    for E in (16, 32, 64, 128, 256, 384):
        assert not gemm_logits(1, E) and not gemm_logits(SPLIT_MAX_TOKENS, E)
        assert gemm_logits(SPLIT_MAX_TOKENS + 1, E) and gemm_logits(16384, E)
    for E in (8, 60, 40):
        assert not gemm_logits(16384, E)


@pytest.mark.parametrize("name,E,k,spec", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
@pytest.mark.parametrize("T", [1, 37])
def test_split_router_matches_reference(name: str, E: int, k: int, spec: RouterSpec, T: int) -> None:
    """The decode path for large router matrices: the matmul split over H chunks and expert blocks (here forced,
    on an H of 200 that leaves the last chunk short and E not a multiple of the expert block), then the selection
    from the partial sums: the same logits, choices and weights as the reference."""
    check_route(name, E, k, spec, T, split=True, H=200)


def test_split_router_adds_many_parts_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """More partial sums than the selection loads at once (H = 1100 over 64-wide chunks: 18 parts on a GPU of
    64 SMs, 8 per load at 16 tokens x 64 experts), the last block partly past the end; E = 60 leaves the expert
    tile ragged."""
    from kernels import moe_router

    monkeypatch.setattr(moe_router, "sm_count", lambda _device: 64)
    assert moe_router.split_plan(37, 60, 1100, 128, force=True)[1] == 18
    check_route("many parts", 60, 4, RouterSpec(top_k=4), 37, split=True, H=1100)
    check_route("many parts, one token", 60, 4, RouterSpec(top_k=4), 1, split=True, H=1100)


def test_split_plan_is_for_decode_sizes() -> None:
    """split_plan: every router splits at <= 64 tokens, into chunks that cover H exactly and about the programs
    asked for; prefill sizes keep the one-kernel router."""
    from kernels.moe_router import SPLIT_BLOCK_H, split_plan

    chunk, parts = split_plan(1, 256, 7168, 264)
    assert chunk % SPLIT_BLOCK_H == 0 and (parts - 1) * chunk < 7168 <= parts * chunk and parts > 16
    assert split_plan(1, 384, 3072, 264) is not None  # 384 experts, bf16
    chunk, parts = split_plan(1, 128, 2048, 264)  # Qwen3: 2 expert blocks x 32 chunks
    assert parts == 2048 // SPLIT_BLOCK_H and chunk == SPLIT_BLOCK_H
    assert split_plan(64, 8, 576, 264) is not None
    assert split_plan(65, 256, 7168, 264) is None  # prefill: many token blocks already spread the work
    assert split_plan(1, 16, 4096, 264)[1] <= 4096 // SPLIT_BLOCK_H


def test_router_rejects_bad_groups() -> None:
    x = torch.randn(2, 16, device=DEV)
    with pytest.raises(ValueError, match="n_group"):
        route(x, torch.randn(10, 16, device=DEV), RouterSpec(top_k=2, n_group=4, topk_group=2))


@pytest.mark.parametrize("T,E,k,block_m,programs", [(1, 8, 2, 16, None), (5, 60, 4, 16, None),
                                                    (300, 64, 8, 16, None), (700, 8, 2, 32, None),
                                                    (129, 128, 8, 64, None), (300, 64, 8, 32, 3),
                                                    (700, 8, 2, 16, 2)])
def test_alignment_groups_and_pads(T: int, E: int, k: int, block_m: int, programs: int | None,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """programs: few programs for the large-routing path, so each takes several steps over its slots."""
    if programs is not None:
        monkeypatch.setattr(moe_align, "TARGET_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(T * 1000 + E)
    ids = skewed_ids(T, E, k, gen, unused=E // 4)
    al = align_slots(ids.to(DEV), E, block_m)
    sorted_slots = al.sorted_slots.cpu().long()
    block_expert = al.block_expert.cpu().long()
    n_pad = int(al.num_padded.item())
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    assert n_pad == int(((counts + block_m - 1) // block_m * block_m).sum())
    real = sorted_slots[sorted_slots < T * k]
    assert torch.equal(torch.sort(real).values, torch.arange(T * k)), "every slot exactly once"
    assert (sorted_slots[n_pad:] == T * k).all()
    for b in range(n_pad // block_m):
        rows = sorted_slots[b * block_m:(b + 1) * block_m]
        rows = rows[rows < T * k]
        assert (flat[rows] == block_expert[b]).all(), f"tile {b} mixes experts"
    assert (block_expert[n_pad // block_m:] == -1).all()
    # Deterministic: expert by expert, the slots in ascending order.
    assert torch.equal(real, torch.sort(flat * (T * k) + torch.arange(T * k)).indices), "not expert-then-slot order"


def ref_gate(h: torch.Tensor, act: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """act(gate) * up of a [.., 2I] pre-activation, gate columns first; "clamped_swiglu" as GPT-OSS's _apply_gate."""
    I = h.shape[-1] // 2
    g, u = h[..., :I], h[..., I:]
    if act == "clamped_swiglu":
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
    f = {"silu": torch.nn.functional.silu, "gelu_pytorch_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
         "gelu": torch.nn.functional.gelu, "relu": torch.relu}[act]
    return f(g) * u


def ref_experts(x, gate_up, down, topw, topi, act="silu", gate_up_bias=None, down_bias=None, alpha=1.702, limit=7.0):
    """float64 loop over experts in transformers' [E, 2I, H] / [E, H, I] layout; optional biases [E, 2I] (gate
    columns first) and [E, H], the down bias added before the routing weight."""
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float64)
    x, gu, dn = x.double().cpu(), gate_up.double().cpu(), down.double().cpu()
    E = gu.shape[0]
    gb = gate_up_bias.double().cpu() if gate_up_bias is not None else torch.zeros(E, gu.shape[1], dtype=torch.float64)
    db = down_bias.double().cpu() if down_bias is not None else torch.zeros(E, H, dtype=torch.float64)
    for t in range(T):
        for j in range(topi.shape[1]):
            e = int(topi[t, j])
            h = gu[e] @ x[t] + gb[e]
            out[t] += float(topw[t, j]) * (dn[e] @ ref_gate(h, act, alpha, limit) + db[e])
    return out


EXPERT_CASES = [
    # (T, E, k, H, I): odd shapes, T=1, decode sizes, skew, unused experts
    (1, 8, 2, 64, 48),
    (3, 60, 4, 72, 40),
    (16, 128, 8, 48, 32),
    (97, 8, 2, 96, 80),
    (64, 64, 8, 40, 24),
]


# The decode paths run at most 4 (GEMV) and 16 tokens (rows); forcing them on more costs the interpreter 20-40 s
# for sizes they never serve, so each is tested on the sizes it runs (the GEMV at 1 and 3 tokens, the rows at 1, 3
# and 16).
SERVES = {"gemv": moe_experts.GEMV_MAX_TOKENS, "rows": moe_experts.ROWS_MAX_TOKENS, "grouped": None}


def served(path: str, T: int) -> int:
    """How many of a test's T tokens `path` is run on: the most it serves (SERVES), the grouped GEMMs all T."""
    return T if SERVES[path] is None else min(T, SERVES[path])


@pytest.mark.parametrize("T,E,k,H,I,path", [(*c, path) for path in ("gemv", "rows", "grouped") for c in EXPERT_CASES
                                             if path == "grouped" or c[0] <= {"gemv": 4, "rows": 16}[path]])
def test_experts_match_float64(T: int, E: int, k: int, H: int, I: int, path: str) -> None:
    gen = torch.Generator().manual_seed(T * 7 + E + H)
    dtype = torch.bfloat16
    x = torch.randn(T, H, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    ids = skewed_ids(T, E, k, gen, unused=E // 8)
    topw = torch.rand(T, k, generator=gen).softmax(-1)
    ref = ref_experts(x, gate_up, down, topw, ids)
    out = fused_experts(x.to(DEV), ExpertWeights(gate_up.to(DEV), down.to(DEV)), topw.to(DEV), ids.to(DEV),
                        force_path=path)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("layout", ["transposed", "interleaved"])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_experts_layouts_and_activations(layout: str, act: str) -> None:
    gen = torch.Generator().manual_seed(3)
    T, E, k, H, I = 21, 8, 2, 64, 32
    x = torch.randn(T, H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    down = torch.randn(E, H, I, generator=gen) / I**0.5
    ids = skewed_ids(T, E, k, gen)
    topw = torch.rand(T, k, generator=gen)
    ref = ref_experts(x, gate_up, down, topw, ids, act=act)
    if layout == "transposed":
        w = ExpertWeights(gate_up.transpose(1, 2).contiguous().to(DEV), down.transpose(1, 2).contiguous().to(DEV),
                          transposed=True)
    else:
        inter = torch.stack([gate_up[:, :I], gate_up[:, I:]], dim=2).reshape(E, 2 * I, H)  # g0, u0, g1, u1, ...
        w = ExpertWeights(inter.to(DEV), down.to(DEV), concatenated=False)
    for path in ("gemv", "grouped"):
        n = served(path, T)
        out = fused_experts(x[:n].to(DEV), w, topw[:n].to(DEV), ids[:n].to(DEV), activation=act, force_path=path)
        assert rel_err(out.cpu(), ref[:n]) < 5e-3, path  # fp32 inputs, tf32-class dots


def ref_shared(x: torch.Tensor, sh: SharedExpert, act: str = "silu") -> torch.Tensor:
    """float64 shared expert on every row of x: [sigmoid(x . gw) *] down(act(gate x) * up x)."""
    xd = x.double().cpu()
    y = ref_gate(torch.cat([xd @ sh.gate.double().cpu().T, xd @ sh.up.double().cpu().T], dim=1), act, 1.702, 7.0)
    y = y @ sh.down.double().cpu().T
    if sh.gate_weight is not None:
        y = torch.sigmoid(xd @ sh.gate_weight.double().cpu().reshape(-1, 1)) * y
    return y


# (T, E, k, H, I, shared width, gated): DeepSeek-like (one routed width, ungated), Qwen2-MoE-like (4 widths,
# gated), a width that is no multiple of the routed one (the last chunk masked) and one narrower than it.
SHARED_CASES = [(1, 8, 2, 64, 48, 48, False), (3, 12, 4, 40, 24, 96, True), (4, 8, 2, 72, 40, 100, True),
                (2, 6, 1, 48, 32, 20, False)]


@pytest.mark.parametrize("layout", ["default", "interleaved"])
@pytest.mark.parametrize("T,E,k,H,I,Is,gated", SHARED_CASES, ids=[f"Is={c[5]}{'-gated' if c[6] else ''}"
                                                                  for c in SHARED_CASES])
def test_shared_expert_slots_match_float64(T: int, E: int, k: int, H: int, I: int, Is: int, gated: bool,
                                           layout: str) -> None:
    """A shared expert inside the decode kernels (its width in chunks of the routed width, weight 1 or its sigmoid
    gate) and beside the grouped path, bf16, against float64 of routed + shared."""
    gen = torch.Generator().manual_seed(T + Is)
    dtype = torch.bfloat16
    x = torch.randn(T, H, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    sh = SharedExpert(*((torch.randn(*s, generator=gen) / s[1]**0.5).to(dtype) for s in ((Is, H), (Is, H), (H, Is))),
                      gate_weight=(torch.randn(1, H, generator=gen) / H**0.5).to(dtype) if gated else None)
    ids = skewed_ids(T, E, k, gen)
    topw = torch.rand(T, k, generator=gen).softmax(-1)
    ref = ref_experts(x, gate_up, down, topw, ids) + ref_shared(x, sh)
    w = as_layout(gate_up, down, None, None, layout)
    sh_dev = SharedExpert(*(t.to(DEV) if t is not None else None for t in dataclasses.astuple(sh)))
    for path in ("gemv", "rows", "grouped"):
        out = fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), force_path=path, shared=sh_dev)
        assert out.dtype == dtype and out.shape == (T, H)
        assert rel_err(out.cpu(), ref) < 1e-2, path
    no_shared = fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), force_path="gemv")
    assert rel_err(no_shared.cpu(), ref) > 0.05  # the shared part is a real share of the output


@pytest.mark.parametrize("groups", [1, 2, 3, 5])
def test_down_slot_groups_match_float64_and_repeat_exactly(groups: int) -> None:
    """The decode down GEMV with a token's slots shared out over `groups` programs (float32 partial sums, then
    slot_sum_kernel): 2 routed slots + 3 shared chunks, so groups of 3 slots straddle routed and shared ones and
    5 groups leave one slot each. Every split matches float64, and two calls give the same bits."""
    gen = torch.Generator().manual_seed(11)
    T, E, k, H, I, Is = 2, 8, 2, 72, 40, 100
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(torch.bfloat16)
    sh = SharedExpert(*((torch.randn(*s, generator=gen) / s[1]**0.5).to(torch.bfloat16)
                        for s in ((Is, H), (Is, H), (H, Is))))
    ids = skewed_ids(T, E, k, gen)
    topw = torch.rand(T, k, generator=gen).softmax(-1)
    ref = ref_experts(x, gate_up, down, topw, ids) + ref_shared(x, sh)
    w = ExpertWeights(gate_up.to(DEV), down.to(DEV))
    sh_dev = SharedExpert(*(t.to(DEV) if t is not None else None for t in dataclasses.astuple(sh)))
    tiles = (moe_experts.GEMV_TILES[0], dataclasses.replace(moe_experts.GEMV_TILES[1], groups=groups))
    outs = [fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), force_path="gemv", gemv=tiles, shared=sh_dev)
            for _ in range(2)]
    assert rel_err(outs[0].cpu(), ref) < 1e-2
    assert torch.equal(outs[0], outs[1])


def test_rows_path_takes_repeated_experts_past_one_tile_and_repeats_exactly() -> None:
    """The expert-rows kernels gather an expert's slots in blocks of 16 rows: with 2 experts, 16 tokens and each
    token's 8 slots drawn with repeats (no router does that, a caller may), an expert has up to 128 slots, so the
    block loop runs several times; a shared expert rides along. Matches float64; two calls give the same bits."""
    gen = torch.Generator().manual_seed(5)
    T, E, k, H, I, Is = 16, 2, 8, 40, 24, 30
    dtype = torch.bfloat16
    x = torch.randn(T, H, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    sh = SharedExpert(*((torch.randn(*s, generator=gen) / s[1]**0.5).to(dtype) for s in ((Is, H), (Is, H), (H, Is))))
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    assert int((ids == 0).sum()) > 16 and int((ids == 1).sum()) > 16
    topw = torch.rand(T, k, generator=gen)
    ref = ref_experts(x, gate_up, down, topw, ids) + ref_shared(x, sh)
    sh_dev = SharedExpert(*(t.to(DEV) if t is not None else None for t in dataclasses.astuple(sh)))
    w = ExpertWeights(gate_up.to(DEV), down.to(DEV))
    outs = [fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), force_path="rows", shared=sh_dev)
            for _ in range(2)]
    assert rel_err(outs[0].cpu(), ref) < 1e-2
    assert torch.equal(outs[0], outs[1])


def test_decode_path_rule() -> None:
    """A handful of tokens: the per-slot GEMV; up to 16 tokens with at most 128 slots in half precision: the expert
    rows, from one token for transposed weights; else the grouped GEMMs (float32 would run as TF32 on the rows
    path's tensor cores). A forced rows path past 128 slots is refused."""
    from kernels.moe_experts import decode_path

    bf16 = torch.bfloat16
    assert decode_path(1, 8, bf16) == decode_path(4, 8, bf16) == "gemv"
    assert decode_path(5, 8, bf16) == decode_path(16, 8, torch.float16) == "rows"
    assert decode_path(1, 4, bf16, transposed=True) == decode_path(16, 4, bf16, transposed=True) == "rows"
    assert decode_path(2, 4, torch.float32, transposed=True) == "gemv"
    assert decode_path(16, 9, bf16) == decode_path(17, 1, bf16) == decode_path(8, 8, torch.float32) == "grouped"


def test_rows_tiles_widen_only_where_every_sm_gets_programs() -> None:
    """Wide column tiles where experts x tiles fill the GPU (gate/up two waves, down one), narrow ones where they
    would leave multiprocessors idle, 256-wide steps from 4096 inputs, 64 x 64 for transposed weights."""
    from kernels.moe_experts import rows_tiles

    def shape(t):
        return t.block_n, t.block_k

    assert [shape(t) for t in rows_tiles(2048, 768, 128, sms=132)] == [(64, 64), (128, 128)]  # Qwen3, 16 tokens
    assert [shape(t) for t in rows_tiles(2048, 512, 16, sms=132)] == [(32, 128), (128, 128)]  # top-1, 16 tokens
    assert [shape(t) for t in rows_tiles(576, 1536, 8, sms=132)] == [(32, 128), (32, 128)]  # SmolLM2-MoE
    assert [shape(t) for t in rows_tiles(7168, 2048, 129, sms=132)] == [(32, 256), (32, 128)]  # DeepSeek-V3
    assert [shape(t) for t in rows_tiles(2880, 2880, 64, transposed=True)] == [(64, 64), (64, 64)]  # GPT-OSS
    w = ExpertWeights(torch.zeros(4, 8, 16), torch.zeros(4, 16, 4))
    with pytest.raises(ValueError, match="at most 128 slots"):
        fused_experts(torch.zeros(17, 16), w, torch.ones(17, 8), torch.zeros(17, 8, dtype=torch.int32),
                      force_path="rows")


def test_down_groups_rule_gives_each_slot_its_own_programs() -> None:
    from kernels.moe_experts import down_groups

    assert down_groups(8) == 8  # Qwen3: 8 routed slots
    assert down_groups(8 + 1) == 9  # DeepSeek-V3: 8 routed + 1 shared chunk
    assert down_groups(1) == 1  # top-1, no shared expert: no second kernel


def test_shared_expert_bad_shapes_and_activation_are_refused() -> None:
    E, H, I = 4, 16, 8
    w = ExpertWeights(torch.zeros(E, 2 * I, H), torch.zeros(E, H, I))
    x, topw, ids = torch.zeros(1, H), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="gate/up \\[Is, H\\]"):
        fused_experts(x, w, topw, ids, shared=SharedExpert(torch.zeros(8, H), torch.zeros(8, H), torch.zeros(8, H)))
    with pytest.raises(ValueError, match="all torch.float32"):
        fused_experts(x, w, topw, ids, shared=SharedExpert(torch.zeros(8, H), torch.zeros(8, H),
                                                             torch.zeros(H, 8, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="shared expert with activation 'clamped_swiglu'"):
        fused_experts(x, w, topw, ids, activation="clamped_swiglu",
                      shared=SharedExpert(torch.zeros(8, H), torch.zeros(8, H), torch.zeros(H, 8)))


def as_layout(gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None,
              down_bias: torch.Tensor | None, layout: str) -> ExpertWeights:
    """ExpertWeights on DEV in `layout` ("default", "transposed", "interleaved", "transposed+interleaved"), from
    [E, 2I, H] / [E, H, I] weights with gate rows first; the gate/up bias [E, 2I] follows the rows' order."""
    E, I2, H = gate_up.shape
    interleaved = "interleaved" in layout
    if interleaved:  # rows g0, u0, g1, u1, ... and the bias's columns likewise
        gate_up = torch.stack([gate_up[:, :I2 // 2], gate_up[:, I2 // 2:]], dim=2).reshape(E, I2, H)
        if gate_up_bias is not None:
            gate_up_bias = torch.stack([gate_up_bias[:, :I2 // 2], gate_up_bias[:, I2 // 2:]], dim=2).reshape(E, I2)
    transposed = "transposed" in layout
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    return ExpertWeights(gate_up.to(DEV), down.to(DEV), transposed=transposed, concatenated=not interleaved,
                         gate_up_bias=gate_up_bias.to(DEV) if gate_up_bias is not None else None,
                         down_bias=down_bias.to(DEV) if down_bias is not None else None)


def gpt_oss_like(T: int, E: int, k: int, H: int, I: int, dtype: torch.dtype, bias: bool, seed: int):
    """Random experts whose gate/up pre-activations reach past the clamp limit (7) for some entries: (x, gate_up,
    down, gate_up_bias, down_bias, topw, ids), weights in [E, 2I, H] / [E, H, I], already rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * (4.0 / H**0.5)).to(dtype)  # pre-activations ~ N(0, 16)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    gate_up_bias = (torch.randn(E, 2 * I, generator=gen) * 2.0).to(dtype) if bias else None
    down_bias = torch.randn(E, H, generator=gen).to(dtype) if bias else None
    ids = skewed_ids(T, E, k, gen)
    topw = torch.rand(T, k, generator=gen).softmax(-1)
    return x, gate_up, down, gate_up_bias, down_bias, topw, ids


def assert_clamp_bites(x, gate_up, gate_up_bias, ids, limit: float = 7.0) -> None:
    """Some routed gate pre-activations exceed limit, some up ones lie outside [-limit, limit], and most of both
    do not: the clamp is exercised without flattening the test."""
    pre = torch.einsum("th,teih->tei", x.double(), gate_up.double()[ids.long()])  # [T, k, 2I]
    if gate_up_bias is not None:
        pre = pre + gate_up_bias.double()[ids.long()]
    I = pre.shape[-1] // 2
    g, u = pre[..., :I], pre[..., I:]
    assert (g > limit).any() and (u.abs() > limit).any(), "the clamp never bites"
    assert (g <= limit).float().mean() > 0.5 and (u.abs() <= limit).float().mean() > 0.5


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("layout", ["default", "transposed", "interleaved", "transposed+interleaved"])
@pytest.mark.parametrize("path", ["gemv", "rows", "grouped"])
def test_experts_clamped_swiglu_and_biases(path: str, layout: str, bias: bool) -> None:
    """GPT-OSS's experts: clamped SwiGLU (alpha 1.702, limit 7, reached by some entries), optional gate/up and
    down biases, every weight layout (GPT-OSS's own is transposed+interleaved); bf16 and fp32."""
    T = {"gemv": 3, "rows": 7, "grouped": 29}[path]
    E, k, H, I = 8, 2, 40, 24
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 5e-3)):  # fp32: tf32-class dots on GPU
        x, gate_up, down, gb, db, topw, ids = gpt_oss_like(T, E, k, H, I, dtype, bias, seed=T + 10 * bias)
        assert_clamp_bites(x, gate_up, gb, ids)
        ref = ref_experts(x, gate_up, down, topw, ids, act="clamped_swiglu", gate_up_bias=gb, down_bias=db)
        w = as_layout(gate_up, down, gb, db, layout)
        out = fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), activation="clamped_swiglu",
                            swiglu_alpha=1.702, swiglu_limit=7.0, force_path=path)
        assert out.dtype == dtype and out.shape == (T, H)
        assert rel_err(out.cpu(), ref) < tol, (dtype, rel_err(out.cpu(), ref))


def test_experts_biases_with_plain_silu_and_other_alpha_limit() -> None:
    """Biases work with a hidden_act gate too, and alpha/limit really reach the kernels (values other than
    GPT-OSS's; a kernel that ignored them would miss the reference)."""
    T, E, k, H, I = 21, 8, 2, 40, 24
    x, gate_up, down, gb, db, topw, ids = gpt_oss_like(T, E, k, H, I, torch.float32, True, seed=4)
    w = as_layout(gate_up, down, gb, db, "interleaved")
    for act, alpha, limit in (("silu", 1.702, 7.0), ("clamped_swiglu", 1.0, 3.0)):
        ref = ref_experts(x, gate_up, down, topw, ids, act=act, gate_up_bias=gb, down_bias=db, alpha=alpha,
                          limit=limit)
        for path in ("gemv", "grouped"):
            n = served(path, T)
            out = fused_experts(x[:n].to(DEV), w, topw[:n].to(DEV), ids[:n].to(DEV), activation=act,
                                swiglu_alpha=alpha, swiglu_limit=limit, force_path=path)
            assert rel_err(out.cpu(), ref[:n]) < 5e-3, (act, path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the descriptor path's unwritten padding rows, see below
@pytest.mark.parametrize("act,bias", [("silu", True), ("clamped_swiglu", True), ("clamped_swiglu", False)])
def test_tma_configs_send_biases_and_clamped_gate_to_pointer_kernels(act: str, bias: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout the descriptor kernels take (concatenated, bf16, aligned) with tile configs asking for them: biased
    experts, or the clamped gate, still match float64, because they went to the pointer kernels (the descriptor
    kernels take neither). Launches are recorded; an unbiased silu control shows the recording sees TMA."""
    T, E, k, H, I = 33, 8, 2, 32, 16
    x, gate_up, down, gb, db, topw, ids = gpt_oss_like(T, E, k, H, I, torch.bfloat16, bias, seed=7)
    w = as_layout(gate_up, down, gb, db, "default")
    assert tma_layout_ok(w.gate_up, w.down, w.transposed, w.concatenated)
    tma = (TileConfig(16, 32, 32, 2, 4, 2, tma=True), TileConfig(16, 32, 32, 2, 4, 2, per_slot=True, tma=True))
    launched: list[str] = []
    real_fast = moe_experts.fast
    monkeypatch.setattr(moe_experts, "fast", lambda fn: launched.append(getattr(fn, "__name__", str(fn)))
                        or real_fast(fn))

    plain = as_layout(gate_up, down, None, None, "default")
    fused_experts(x.to(DEV), plain, topw.to(DEV), ids.to(DEV), configs=tma, force_path="grouped")
    assert {"gate_up_tma_kernel", "down_tma_kernel"} <= set(launched), launched  # the control took TMA
    launched.clear()

    ref = ref_experts(x, gate_up, down, topw, ids, act=act, gate_up_bias=gb, down_bias=db)
    out = fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), activation=act, configs=tma, force_path="grouped")
    assert rel_err(out.cpu(), ref) < 1e-2
    assert "gate_up_kernel" in launched and "gate_up_tma_kernel" not in launched, launched
    assert ("down_kernel" in launched) == bias and ("down_tma_kernel" in launched) == (not bias), launched


def test_expert_biases_must_come_in_pairs_of_the_right_shape() -> None:
    gate_up, down = torch.zeros(4, 32, 24), torch.zeros(4, 24, 16)
    x, ids, topw = torch.zeros(2, 24), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)
    for gb, db in ((torch.zeros(4, 32), None), (torch.zeros(4, 32), torch.zeros(4, 16)),
                   (torch.zeros(4, 16), torch.zeros(4, 24))):
        w = ExpertWeights(gate_up, down, gate_up_bias=gb, down_bias=db)
        with pytest.raises(ValueError, match="biases"):
            fused_experts(x, w, topw, ids)


def test_clamped_swiglu_is_not_a_hidden_act() -> None:
    """A config's hidden_act can never select the clamped gate: ACTIVATIONS (what hf_moe checks hidden_act
    against) does not hold it."""
    from kernels.moe_grouped_gemm import ACTIVATIONS, CLAMPED_SWIGLU, KERNEL_ACTIVATIONS

    assert CLAMPED_SWIGLU not in ACTIVATIONS and CLAMPED_SWIGLU in KERNEL_ACTIVATIONS


def test_experts_per_slot_reduction_matches() -> None:
    """The down GEMM's per-slot-store variant (sum over k afterwards) computes the same as the atomic one."""
    gen = torch.Generator().manual_seed(11)
    T, E, k, H, I = 45, 16, 4, 48, 40
    x = torch.randn(T, H, generator=gen).bfloat16()
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16()
    ids = skewed_ids(T, E, k, gen)
    topw = torch.rand(T, k, generator=gen)
    ref = ref_experts(x, gate_up, down, topw, ids)
    up = TileConfig(16, 32, 32, 2, 4, 2)
    for per_slot in (False, True):
        down_cfg = TileConfig(16, 32, 32, 2, 4, 2, per_slot=per_slot)
        out = fused_experts(x.to(DEV), ExpertWeights(gate_up.to(DEV), down.to(DEV)), topw.to(DEV), ids.to(DEV),
                            configs=(up, down_cfg), force_path="grouped")
        assert rel_err(out.cpu(), ref) < 1e-2, per_slot


def test_experts_top1_and_empty() -> None:
    gen = torch.Generator().manual_seed(5)
    T, E, H, I = 33, 4, 32, 16
    x = torch.randn(T, H, generator=gen).bfloat16()
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16()
    ids = torch.zeros(T, 1, dtype=torch.int32)  # every token on expert 0: three experts get nothing
    topw = torch.ones(T, 1)
    out = fused_experts(x.to(DEV), ExpertWeights(gate_up.to(DEV), down.to(DEV)), topw.to(DEV), ids.to(DEV),
                        force_path="grouped")
    assert rel_err(out.cpu(), ref_experts(x, gate_up, down, topw, ids)) < 1e-2
    empty = fused_experts(x[:0].to(DEV), ExpertWeights(gate_up.to(DEV), down.to(DEV)), topw[:0].to(DEV),
                          ids[:0].to(DEV))
    assert empty.shape == (0, H)


# The activation's padding rows are never written (uninitialised memory, possibly inf/nan); the interpreter warns
# when it multiplies them. Their outputs are masked at the store, and the test checks the output is finite.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("grid", ["per tile", "persistent", "persistent flatten"])
@pytest.mark.parametrize("T,E,k,H,I,per_slot", [(97, 8, 2, 96, 80, False), (64, 64, 8, 40, 24, True),
                                                 (33, 4, 1, 32, 16, False)])
def test_experts_tma_path_matches_float64(grid: str, T: int, E: int, k: int, H: int, I: int, per_slot: bool) -> None:
    """The tensor-descriptor GEMMs (kernels.moe_grouped_tma), one program per tile or a persistent grid: odd H and
    I (column tiles that run into the next expert's rows), unused experts, top-1."""
    gen = torch.Generator().manual_seed(T + H)
    x = torch.randn(T, H, generator=gen).bfloat16()
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16()
    ids = skewed_ids(T, E, k, gen, unused=E // 8) if k > 1 else torch.zeros(T, 1, dtype=torch.int32)
    topw = torch.rand(T, k, generator=gen).softmax(-1)
    ref = ref_experts(x, gate_up, down, topw, ids)
    opts = {"per tile": {}, "persistent": {"programs_per_sm": 1},
            "persistent flatten": {"programs_per_sm": 1, "flatten": True}}[grid]
    up = TileConfig(16, 32, 32, 2, 4, 2, tma=True, **opts)
    dn = TileConfig(16, 32, 32, 2, 4, 2, per_slot=per_slot, tma=True, **opts)
    w = ExpertWeights(gate_up.to(DEV), down.to(DEV))
    assert tma_layout_ok(w.gate_up, w.down, w.transposed, w.concatenated)
    out = fused_experts(x.to(DEV), w, topw.to(DEV), ids.to(DEV), configs=(up, dn), force_path="grouped")
    assert out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), ref) < 1e-2


def test_tma_layout_check_sends_other_layouts_to_the_pointer_kernels() -> None:
    gate_up, down = torch.zeros(4, 32, 24).bfloat16(), torch.zeros(4, 24, 16).bfloat16()
    assert tma_layout_ok(gate_up, down, False, True)
    assert not tma_layout_ok(gate_up, down, True, True)  # transposed
    assert not tma_layout_ok(gate_up, down, False, False)  # interleaved gate/up rows
    assert not tma_layout_ok(gate_up.float(), down.float(), False, True)  # fp32 takes the pointer path
    odd = torch.zeros(4, 32, 20).bfloat16()  # 40-byte rows: not 16-byte aligned
    assert not tma_layout_ok(odd, torch.zeros(4, 20, 16).bfloat16(), False, True)
    assert not tma_layout_ok(gate_up.transpose(1, 2).contiguous().transpose(1, 2), down, False, True)  # strided


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the descriptor path's unwritten padding rows, as above
@pytest.mark.parametrize("T,E,k,H,I", [(3, 60, 4, 72, 40), (37, 8, 2, 96, 80)])
def test_fp16_router_and_experts(T: int, E: int, k: int, H: int, I: int) -> None:
    """fp16 end to end: the router, then the experts on the decode path, the pointer GEMMs and the descriptor
    GEMMs, each against float64."""
    gen = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, H, generator=gen).half()
    w_router = (torch.randn(E, H, generator=gen) * 0.2).half()
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).half()
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).half()
    logits, topw, topi = route(x.to(DEV), w_router.to(DEV), RouterSpec(top_k=k))
    assert logits.dtype == torch.float16
    assert rel_err(logits.cpu(), x.double() @ w_router.double().T) < 1e-2
    ref = ref_experts(x, gate_up, down, topw.cpu(), topi.cpu())
    w = ExpertWeights(gate_up.to(DEV), down.to(DEV))
    tma = (TileConfig(16, 32, 32, 2, 4, 2, tma=True), TileConfig(16, 32, 32, 2, 4, 2, per_slot=True, tma=True,
                                                                  programs_per_sm=1))
    for path, configs in (("gemv", None), ("grouped", None), ("grouped", tma)):
        n = served(path, T)
        out = fused_experts(x[:n].to(DEV), w, topw[:n], topi[:n], configs=configs, force_path=path)
        assert out.dtype == torch.float16
        assert rel_err(out.cpu(), ref[:n]) < 1e-2, (path, configs is not None)


def test_decode_tiles_step_no_wider_than_the_expert_row() -> None:
    """fit_k: a decode tile's step over the input shrinks to the row rounded up to a power of two (at least 32),
    never grows, and keeps the tile's other fields."""
    fit_k, Gemv, Rows = moe_experts.fit_k, moe_experts.GemvConfig, moe_experts.RowsConfig
    assert fit_k(Gemv(4, 1024, 4, groups=2), 256) == Gemv(4, 256, 4, groups=2)
    assert fit_k(Gemv(4, 1024, 4), 300).block_k == 512
    assert fit_k(Gemv(4, 1024, 4), 24).block_k == 32
    assert fit_k(Gemv(4, 1024, 4), 7168) == Gemv(4, 1024, 4)
    assert fit_k(Rows(128, 128, 4, 3), 1408) == Rows(128, 128, 4, 3)
    assert fit_k(Rows(32, 256, 4, 3), 40) == Rows(32, 64, 4, 3)
