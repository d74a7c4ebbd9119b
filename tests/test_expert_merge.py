"""Derivation methods: each reproduces the dense FFN of an upcycled teacher (identical experts) at full
width, weights experts by measured routing mass, and selects to a chosen width; layers kept by influence."""
from __future__ import annotations

import pytest
import torch

from students.derive import derive_dense_student
from students.expert_merge import METHODS, merge_experts
from students.layer_importance import block_influence, most_influential
from students.routing_stats import routing_mass
from teachers.upcycle import upcycle_llama
from tests.test_models import tiny_llama


def _experts(e: int, inter: int, h: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)


def _ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reproduces_the_dense_model_it_was_upcycled_from(method: str) -> None:
    dense = tiny_llama()
    moe = upcycle_llama(dense, num_experts=4, top_k=2, router_init_std=0.5)
    ids = torch.randint(0, 300, (3, 11))
    mass = routing_mass(moe, [ids])
    for width in (0, 2 * 80) if method == "select" else (0,):  # select: one expert, and two side by side
        student = derive_dense_student(moe, keep_layers="all", method=method, ffn_width=width, mass=mass)
        with torch.no_grad():
            assert torch.allclose(dense(ids).logits, student(ids).logits, atol=1e-4), (method, width)


def test_routing_mass_sums_to_one_per_layer_and_matches_the_router() -> None:
    moe = upcycle_llama(tiny_llama(layers=2), num_experts=4, top_k=2, router_init_std=1.0)
    ids = torch.randint(0, 300, (2, 9))
    mass = routing_mass(moe, ids.split(1))
    assert mass.shape == (2, 4) and torch.allclose(mass.sum(-1), torch.ones(2), atol=1e-5)
    # By hand for layer 1: capture what its MoE block receives, route it with the router's own weight.
    seen: list[torch.Tensor] = []
    hook = moe.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        moe(input_ids=ids)
    hook.remove()
    x = seen[0].reshape(-1, 48)
    w, idx = torch.softmax(x @ moe.model.layers[1].mlp.gate.weight.T, -1).topk(2, -1)
    ref = torch.zeros(18, 4).scatter_(-1, idx, w / w.sum(-1, keepdim=True)).mean(0)
    assert torch.allclose(mass[1], ref, atol=1e-5), (mass[1], ref)


def test_frequency_weights_by_mass_and_select_picks_the_heavy_expert() -> None:
    gu, dn = _experts(3, 8, 6)
    mass = torch.tensor([0.7, 0.2, 0.1])
    g, u, d = merge_experts(gu, dn, "frequency", mass)
    assert torch.allclose(d, 0.7 * dn[0] + 0.2 * dn[1] + 0.1 * dn[2], atol=1e-6)
    assert torch.allclose(g, 0.7 * gu[0, :8] + 0.2 * gu[1, :8] + 0.1 * gu[2, :8], atol=1e-6)
    g, u, d = merge_experts(gu, dn, "select", mass * torch.tensor([1.0, 1.0, 100.0]), width=8)
    assert torch.equal(g, gu[2, :8]) and torch.allclose(d, dn[2])  # expert 2 now has the most mass x size
    # Two experts side by side: the FFN is the mass-weighted average of their outputs.
    g, u, d = merge_experts(gu, dn, "select", mass, width=16)
    x = torch.randn(5, 6)
    ref = (0.7 * _ffn(gu[0, :8], gu[0, 8:], dn[0], x) + 0.2 * _ffn(gu[1, :8], gu[1, 8:], dn[1], x)) / 0.9
    assert g.shape == (16, 6) and d.shape == (6, 16)
    assert torch.allclose(_ffn(g, u, d, x), ref, atol=1e-4)
    assert merge_experts(gu, dn, "select", mass, width=11)[0].shape == (11, 6)  # a cut expert


def test_bad_derivation_arguments_say_what_is_valid() -> None:
    gu, dn = _experts(2, 4, 3)
    with pytest.raises(ValueError, match="available: uniform, frequency, select"):
        merge_experts(gu, dn, "svd")
    with pytest.raises(ValueError, match="needs method=select"):
        merge_experts(gu, dn, "uniform", width=6)
    with pytest.raises(ValueError, match="between 1 and E x I"):
        merge_experts(gu, dn, "select", width=9)
    with pytest.raises(ValueError, match="non-negative"):
        merge_experts(gu, dn, "frequency", torch.tensor([-1.0, 2.0]))


def test_block_influence_finds_the_layer_that_does_nothing() -> None:
    dense = tiny_llama(layers=4)
    with torch.no_grad():  # layer 1 adds zero to the residual stream: it is the identity
        dense.model.layers[1].self_attn.o_proj.weight.zero_()
        dense.model.layers[1].mlp.down_proj.weight.zero_()
    moe = upcycle_llama(dense, num_experts=4, top_k=2)
    ids = torch.randint(0, 300, (2, 13))
    influence = block_influence(moe, ids.split(1))
    assert influence.shape == (4,) and influence[1].abs() < 1e-6 and (influence[[0, 2]] > 1e-3).all()
    student = derive_dense_student(moe, keep_layers="top_3", influence=influence)
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, moe.model.layers[2].self_attn.q_proj.weight)
    assert most_influential(torch.tensor([0.5, 0.1, 0.3, 0.0]), 2) == [0, 3]  # the last layer always stays
    with pytest.raises(ValueError, match="needs layer influence"):
        derive_dense_student(moe, keep_layers="top_2")
