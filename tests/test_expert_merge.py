"""Derivation methods: each reproduces the dense FFN of an upcycled teacher (identical experts) at full
width and rank, on every supported family (Mixtral, Qwen2-MoE with a gated shared expert, Qwen3-MoE, DeepSeek-V3
with scaled sigmoid routing, shared experts and a dense first layer); weights experts by measured routing mass;
selects to a chosen width; gathers in a low-rank subspace; keeps layers by influence."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from core.errors import UnsupportedModelError
from students.derive import derive_dense_student, fit_width
from students.expert_merge import METHODS, merge_experts
from students.layer_importance import block_influence, most_influential
from students.routing_stats import routing_mass, routing_stats
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
    stats = routing_stats(moe, [ids])
    for width in (0, 2 * 80) if method == "select" else (0,):  # select: one expert, and two side by side
        student = derive_dense_student(moe, keep_layers="all", method=method, ffn_width=width, stats=stats,
                                       svd_rank=48 if method == "svd" else 0)
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
    with pytest.raises(ValueError, match="available: uniform, frequency, select, svd"):
        merge_experts(gu, dn, "mean")
    with pytest.raises(ValueError, match="applies to method=svd only"):
        merge_experts(gu, dn, "uniform", rank=2)
    with pytest.raises(ValueError, match="between 1 and the hidden size 3"):
        merge_experts(gu, dn, "svd", rank=4)
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
    student = derive_dense_student(moe, keep_layers="top_3", influence=influence, stats=routing_stats(moe, [ids]))
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, moe.model.layers[2].self_attn.q_proj.weight)
    assert most_influential(torch.tensor([0.5, 0.1, 0.3, 0.0]), 2) == [0, 3]  # the last layer always stays
    with pytest.raises(ValueError, match="needs layer influence"):
        derive_dense_student(moe, keep_layers="top_2")


def test_svd_keeps_the_mass_weighted_average_within_the_experts_shared_subspace() -> None:
    gu, dn = _experts(3, 8, 6, seed=1)
    mass = torch.tensor([0.6, 0.3, 0.1])
    full = merge_experts(gu, dn, "frequency", mass)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full, merge_experts(gu, dn, "svd", mass, rank=6)))
    g, u, d = merge_experts(gu, dn, "svd", mass, rank=2)
    # Rank 2 in the hidden space: every projection reads from / writes to the same 2-dim subspace.
    assert torch.linalg.matrix_rank(torch.cat([g, u])) == 2 and torch.linalg.matrix_rank(d) == 2
    # A direction only one expert reads, and that expert is never routed: dropped, unlike in the average.
    gu2 = gu.clone()
    gu2[:, :, 5] = 0
    gu2[2, :, 5] = 50.0
    g, u, d = merge_experts(gu2, dn, "svd", torch.tensor([0.5, 0.5, 1e-9]), rank=5)
    assert g[:, 5].abs().max() < 1e-3 and merge_experts(gu2, dn, "uniform")[0][:, 5].abs().min() > 10


def _identical_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Make every routed expert of every layer a copy of expert 0: the MoE then computes a dense function."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(p[:1].expand_as(p))
    return model


def _tiny(cfg: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random routers with clear preferences, so routing masses differ per expert
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model


_COMMON = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, num_experts_per_tok=2)
FAMILIES = {
    # Renormalised top-k, attention with q/k/v biases, and a shared expert behind a sigmoid gate; the gate's
    # weight is zeroed (a constant 0.5) so the dense twin can match the teacher exactly.
    "qwen2_moe": lambda: Qwen2MoeConfig(**_COMMON, num_experts=6, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=24, intermediate_size=40,
                                        norm_topk_prob=True),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_COMMON, num_experts=5, moe_intermediate_size=16, intermediate_size=40,
                                        norm_topk_prob=True),
    # Sigmoid router with a score bias and group-limited top-k, weights scaled by 2.5, one shared expert and a
    # dense first layer (as wide as a derived layer, 16 + 16, so it is copied unchanged); MLA attention.
    "deepseek_v3": lambda: DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, n_routed_experts=8, moe_intermediate_size=16,
                                            n_shared_experts=1, intermediate_size=32, first_k_dense_replace=1,
                                            n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=None,
                                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reproduces_an_upcycled_teacher_of_each_family(family: str, method: str) -> None:
    teacher = _identical_experts(_tiny(FAMILIES[family]()))
    with torch.no_grad():
        for layer in teacher.model.layers:
            if hasattr(layer.mlp, "shared_expert_gate"):
                layer.mlp.shared_expert_gate.weight.zero_()
    ids = torch.randint(0, 120, (2, 13))
    stats = routing_stats(teacher, ids.split(1))
    student = derive_dense_student(teacher, keep_layers="all", method=method, stats=stats,
                                   svd_rank=32 if method == "svd" else 0)
    assert type(student).__name__ == {"qwen2_moe": "Qwen2ForCausalLM", "qwen3_moe": "Qwen3ForCausalLM",
                                      "deepseek_v3": "DeepseekV3ForCausalLM"}[family]
    assert not any(".experts." in n for n in student.state_dict())
    with torch.no_grad():
        ref, out = teacher(ids).logits, student(ids).logits
    assert torch.allclose(ref, out, atol=1e-4), (family, method, (ref - out).abs().max())


def test_routing_stats_read_the_routers_own_weights_and_the_shared_gate() -> None:
    teacher = _tiny(FAMILIES["deepseek_v3"]())
    ids = torch.randint(0, 120, (2, 9))
    stats = routing_stats(teacher, [ids])
    assert stats.mass.shape == (3, 8) and stats.mass[0].abs().sum() == 0  # layer 0 is dense
    assert torch.allclose(stats.mass[1:].sum(-1), torch.full((2,), 2.5), atol=1e-5)  # renormalised, then x 2.5
    assert torch.equal(stats.shared_gate, torch.ones(3))  # DeepSeek's shared experts are ungated
    cfg = FAMILIES["qwen2_moe"]()
    cfg.norm_topk_prob = False
    qwen = _tiny(cfg)
    seen: list[torch.Tensor] = []
    hook = qwen.model.layers[2].mlp.shared_expert_gate.register_forward_hook(lambda m, a, o: seen.append(o))
    stats = routing_stats(qwen, [ids])
    hook.remove()
    assert (stats.mass.sum(-1) < 1).all()  # top-2 of 6 softmax weights, not renormalised
    assert torch.allclose(stats.shared_gate[2], torch.sigmoid(seen[0]).mean(), atol=1e-6)
    # A gated shared expert without measured stats is refused, not guessed.
    with pytest.raises(ValueError, match="gated shared expert"):
        derive_dense_student(qwen, keep_layers="all")


def test_dense_layers_are_fitted_to_the_student_width() -> None:
    g, u, d = torch.randn(6, 5), torch.randn(6, 5), torch.randn(5, 6)
    x = torch.randn(4, 5)
    wide = fit_width((g, u, d), 9)
    assert wide[0].shape == (9, 5) and torch.allclose(_ffn(*wide, x), _ffn(g, u, d, x), atol=1e-6)  # zero neurons
    u[2] *= 100  # neuron 2 is the one to keep
    assert torch.equal(fit_width((g, u, d), 1)[1], u[2:3])
    cfg = FAMILIES["deepseek_v3"]()
    cfg.intermediate_size = 48  # the dense first layer is wider than a derived layer (32): cut to 32
    teacher = _tiny(cfg)
    student = derive_dense_student(teacher, keep_layers="all", stats=routing_stats(teacher, [torch.randint(0, 120, (1, 8))]))
    assert student.config.intermediate_size == 32 and student.model.layers[0].mlp.up_proj.weight.shape == (32, 32)


def test_a_family_without_a_dense_twin_is_refused_with_the_fix() -> None:
    olmoe = _tiny(OlmoeConfig(**_COMMON, num_experts=4, intermediate_size=16))
    with pytest.raises(UnsupportedModelError, match="'olmoe' teacher.*STUDENT=<dense model"):
        derive_dense_student(olmoe, keep_layers="all")
