"""The one-launch decode block (kernels/moe_block_decode.py) against float64: router inside or read from a router
launch, shared experts gated and not, layouts, repeated experts across tokens, the workspace left zero.

Runs on GPU when there is one, else through the Triton interpreter (which runs the programs one after another:
the last-arriving program is then the last program, a case of the GPU's any order).
"""

from __future__ import annotations

import pytest
import torch

from kernels import moe_block_decode as bd
from kernels.moe_block_decode import BlockTiles, block_decode, block_tiles, route_inside, workspace
from kernels.moe_experts import ExpertWeights, SharedExpert
from kernels.moe_router import RouterSpec, route
from tests.test_moe_kernels import DEV, as_layout, ref_experts, ref_scores, ref_shared, rel_err, skewed_ids


def ref_route(x: torch.Tensor, w: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None):
    """float64 top-k (weights [T, k], ids [T, k]) from logits computed as the model's router does them."""
    logits = x.float() @ w.float().T
    if not spec.fp32_logits:  # F.linear on a GPU: float32 accumulation, rounded to the input dtype
        logits = logits.to(x.dtype)
    s, choice = ref_scores(logits, spec, bias)
    ids = choice.topk(spec.top_k, dim=-1).indices
    topw = s.gather(1, ids)
    if spec.renormalize:
        topw = topw / topw.sum(-1, keepdim=True)
    return topw * spec.scaling, ids


def make(T, E, H, I, dtype, seed, layout="default"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    return gen, x, gate_up, down, as_layout(gate_up, down, None, None, layout)


def make_shared(gen, H, Is, dtype, gated) -> SharedExpert:
    return SharedExpert((torch.randn(Is, H, generator=gen) / H**0.5).to(dtype).to(DEV),
                        (torch.randn(Is, H, generator=gen) / H**0.5).to(dtype).to(DEV),
                        (torch.randn(H, Is, generator=gen) / Is**0.5).to(dtype).to(DEV),
                        torch.randn(1, H, generator=gen).to(dtype).to(DEV) if gated else None)


ROUTED_CASES = [
    # (name, T, E, H, I, spec, shared width, gated)
    ("smollm2-like T=1", 1, 8, 64, 48, RouterSpec(top_k=2), 0, False),
    ("softmax no renorm T=5 shared gated", 5, 12, 40, 24, RouterSpec(top_k=4, renormalize=False), 96, True),
    ("top-1 T=16 shared ungated", 16, 8, 48, 32, RouterSpec(top_k=1), 20, False),
    ("deepseek grouped sigmoid T=3", 3, 16, 56, 32,
     RouterSpec(top_k=4, scoring="sigmoid", n_group=4, topk_group=2, scaling=2.5, fp32_logits=True), 32, False),
]


@pytest.mark.parametrize("name,T,E,H,I,spec,Is,gated", ROUTED_CASES, ids=[c[0] for c in ROUTED_CASES])
def test_block_routes_inside_and_matches_float64(name, T, E, H, I, spec, Is, gated) -> None:
    dtype = torch.bfloat16
    gen, x, gate_up, down, w = make(T, E, H, I, dtype, seed=T + E)
    rw = (torch.randn(E, H, generator=gen) / H**0.5).to(dtype)
    bias = torch.rand(E, generator=gen) * 0.1 if spec.scoring == "sigmoid" else None
    sh = make_shared(gen, H, Is, dtype, gated) if Is else None
    topw, ids = ref_route(x, rw, spec, bias)
    ref = ref_experts(x, gate_up, down, topw, ids) + (ref_shared(x, sh) if sh is not None else 0)
    out = block_decode(x.to(DEV), w, router_weight=rw.to(DEV), spec=spec,
                       router_bias=bias.to(DEV) if bias is not None else None, shared=sh)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out.cpu(), ref) < 1e-2
    acc, cnt = workspace(x.to(DEV).device, T * H)
    assert int(cnt.item()) == 0 and not acc.any(), "the kernel must leave its workspace zero"
    again = block_decode(x.to(DEV), w, router_weight=rw.to(DEV), spec=spec,
                         router_bias=bias.to(DEV) if bias is not None else None, shared=sh)
    assert rel_err(again.cpu(), ref) < 1e-2  # a second call on the same workspace


@pytest.mark.parametrize("layout", ["default", "interleaved", "transposed"])
def test_block_reads_a_routers_topk_with_repeated_experts(layout: str) -> None:
    """Top-k from a router launch; popular experts chosen by many tokens (each read once for all of them), fp32
    weights, every weight layout, narrow tiles so that several I tiles and H steps run."""
    T, E, k, H, I = 11, 6, 3, 72, 40
    gen, x, gate_up, down, w = make(T, E, H, I, torch.float32, seed=5, layout=layout)
    ids = skewed_ids(T, E, k, gen, skew=2.0)
    topw = torch.rand(T, k, generator=gen)
    ref = ref_experts(x, gate_up, down, topw, ids)
    out = block_decode(x.to(DEV), w, topk_weights=topw.to(DEV), topk_ids=ids.to(DEV),
                       tiles=BlockTiles(block_i=16, block_h=32, block_n=32))
    assert rel_err(out.cpu(), ref) < 5e-3  # fp32 inputs, tf32-class dots on a GPU


def test_block_rounds_weights_as_the_router_hands_them() -> None:
    """round_weights: routers that return their top-k weights in the input dtype (OLMoE, Qwen-MoE). Inputs and
    router entries are small multiples of powers of two, so the logits are exact in bf16 whatever the rounding
    mode (the interpreter's float32 -> bf16 conversion is not round-to-nearest), and the weights' rounding is
    what the test sees."""
    T, E, H, I = 2, 8, 16, 32
    spec = RouterSpec(top_k=2)
    gen, _, gate_up, down, w = make(T, E, H, I, torch.bfloat16, seed=9)
    x = torch.randint(-1, 2, (T, H), generator=gen).to(torch.bfloat16)
    rw = (torch.randint(-8, 9, (E, H), generator=gen) / 64).to(torch.bfloat16)  # |logit| <= 2 in steps of 1/64
    best = (x.float() @ rw.float().T).topk(3, dim=-1).values
    assert (best[:, :-1] > best[:, 1:]).all(), "a tie among the top 3: pick another seed"
    topw, ids = ref_route(x, rw, spec, None)
    ref = ref_experts(x, gate_up, down, topw.to(torch.bfloat16), ids)
    out = block_decode(x.to(DEV), w, router_weight=rw.to(DEV), spec=spec, round_weights=True)
    # The same as the kernel fed a router launch's bf16 weights (only the atomics' order may differ on a GPU).
    _, tw, ti = route(x.to(DEV), rw.to(DEV), spec, weights_dtype=torch.bfloat16)
    assert torch.equal(ti.cpu().long(), ids)
    fed = block_decode(x.to(DEV), w, topk_weights=tw, topk_ids=ti)
    assert rel_err(out.cpu(), fed.cpu().double()) < 2e-3
    # Against float64: the interpreter converts float32 to bf16 by truncation (a bias of -2^-9 per conversion,
    # three of them here), so the bound is 1.5e-2 there; a GPU rounds to nearest.
    assert rel_err(out.cpu(), ref) < (1e-2 if DEV == "cuda" else 1.5e-2)


def test_block_decode_refuses_what_it_does_not_cover() -> None:
    gen, x, gate_up, down, w = make(2, 8, 32, 16, torch.bfloat16, seed=1)
    ids = torch.zeros(2, 2, dtype=torch.int32)
    topw = torch.ones(2, 2)
    with pytest.raises(ValueError, match="tokens"):
        block_decode(torch.zeros(17, 32, dtype=torch.bfloat16), w, topk_weights=topw, topk_ids=ids)
    with pytest.raises(ValueError, match="either"):
        block_decode(x, w)
    with pytest.raises(ValueError, match="activation"):
        block_decode(x, w, topk_weights=topw, topk_ids=ids, activation="clamped_swiglu")
    with pytest.raises(ValueError, match="biases"):
        biased = ExpertWeights(w.gate_up, w.down, gate_up_bias=torch.zeros(8, 32), down_bias=torch.zeros(8, 32))
        block_decode(x, biased, topk_weights=topw, topk_ids=ids)
    with pytest.raises(ValueError, match="RouterSpec"):
        block_decode(x, w, router_weight=torch.zeros(8, 32))
    with pytest.raises(ValueError, match="n_group"):
        block_decode(x, w, router_weight=torch.zeros(8, 32), spec=RouterSpec(top_k=2, n_group=3))


def test_route_inside_and_tiles_rules() -> None:
    # SmolLM2-MoE's 8 x 576 and a 32 x 2048 bf16 router inside; Qwen3's 128 x 2048 (512 KiB) from its own launch.
    assert route_inside(torch.empty(8, 576, dtype=torch.bfloat16), RouterSpec(top_k=2))
    assert route_inside(torch.empty(32, 2048, dtype=torch.bfloat16), RouterSpec(top_k=1))
    assert not route_inside(torch.empty(128, 2048, dtype=torch.bfloat16), RouterSpec(top_k=8))
    assert not route_inside(torch.empty(512, 64, dtype=torch.bfloat16), RouterSpec(top_k=8))  # > MAX_ROUTER_EXPERTS
    # Every SM gets a program: two experts of width 1536 on 132 SMs take 16-column tiles (192 programs), eight
    # take 64 (192), one 512-wide expert 16 (32: no width gives 132).
    assert block_tiles(2, 576, 1536, 132).block_i == 16
    assert block_tiles(8, 2048, 1536, 132).block_i == 64
    assert block_tiles(1, 2048, 512, 132).block_i == 16
    assert bd.MAX_TOKENS == 16
