"""The teacher's continued training (teachers/continued_training.py) on a tiny upcycled Llama: experts that
start as exact copies drift apart, the load-balancing loss is applied and logged, and a run stopped by the
time limit resumes to exactly the weights of one that never stopped."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core import deadline
from pipelines.config import ConfigError, TeacherTuneConfig
from teachers.continued_training import (
    add_expert_noise,
    expert_spread,
    measure_routing,
    set_router_jitter,
    tune_teacher,
)
from teachers.upcycle import upcycle_llama


def _teacher(experts: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return upcycle_llama(dense, num_experts=experts, top_k=2, router_init_std=0.02).float()


def _data(n: int = 16, s: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (n, s), generator=g, dtype=torch.int32)


CFG = TeacherTuneConfig(steps=6, lr=3e-3, warmup_steps=1, batch_size=4, micro_batch_size=2, aux_loss_coef=0.05,
                        router_jitter=0.05, checkpoint_every=2)


def test_upcycled_experts_start_as_copies_and_drift_apart(tmp_path: Path) -> None:
    model = _teacher()
    assert expert_spread(model) == pytest.approx([0.0, 0.0], abs=1e-6)  # sparse upcycling copies the MLP
    out = tune_teacher(model, _data(), CFG, tmp_path / "ckpt", torch.device("cpu"))
    spread = expert_spread(model)
    assert len(spread) == 2 and all(s > 1e-4 for s in spread), spread
    assert out["steps"] == 6 and out["tokens"] == 6 * 4 * 24
    # transformers' load-balancing loss is E * sum_e f_e P_e with f summing to top_k: 2 when perfectly even.
    assert 1.9 < out["final_aux"] < 4.0 and out["final_ce"] > 0
    assert not model.training


def test_aux_loss_is_part_of_the_objective(tmp_path: Path) -> None:
    """With the load-balancing loss weighted, the routers get a different gradient than without it."""
    runs = {}
    for coef in (0.0, 1.0):
        model = _teacher()
        cfg = TeacherTuneConfig(**{**CFG.__dict__, "steps": 1, "aux_loss_coef": coef, "router_jitter": 0.0})
        tune_teacher(model, _data(), cfg, tmp_path / f"c{coef}", torch.device("cpu"))
        runs[coef] = model.model.layers[0].mlp.gate.weight.detach().clone()
    assert not torch.allclose(runs[0.0], runs[1.0])


def test_time_limit_stop_then_resume_equals_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _teacher()
    tune_teacher(whole, _data(), CFG, tmp_path / "whole", torch.device("cpu"))

    part = _teacher()
    # 20 s left: less than a checkpoint's allowance (30 s), so the loop stops after its first step.
    monkeypatch.setenv(deadline.ENV, str(time.time() + 20))
    with pytest.raises(deadline.TimeLimitReached, match="step 1 of 6"):
        tune_teacher(part, _data(), CFG, tmp_path / "part", torch.device("cpu"))
    monkeypatch.delenv(deadline.ENV)
    resumed = _teacher()  # a new process: fresh weights, everything else from the checkpoint
    out = tune_teacher(resumed, _data(), CFG, tmp_path / "part", torch.device("cpu"))
    assert out["steps"] == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_expert_noise_is_per_expert_and_seeded() -> None:
    a, b = _teacher(), _teacher()
    assert add_expert_noise(a, 0.01, seed=3) == 2 * 2 * 4  # 2 layers x 2 stacked tensors x 4 experts
    add_expert_noise(b, 0.01, seed=3)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    spread = expert_spread(a)
    assert all(0.005 < s < 0.05 for s in spread), spread  # about sqrt(2) x 1% relative noise


def test_router_jitter_and_routing_probe() -> None:
    model = _teacher()
    assert set_router_jitter(model, 0.1) == 2
    assert all(m.jitter_noise == 0.1 for m in model.modules() if hasattr(m, "jitter_noise"))
    summary = measure_routing(model, _data(6), torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], batch_size=4)
    assert summary["layers"] == [0, 1] and summary["experts"] == 4
    assert all(sum(row) == 6 * 24 * 2 for row in summary["tokens_per_expert"])  # every token, top-2
    assert 0 < summary["mean"]["routing_entropy"] <= 1
    assert set(summary["specialisation_js_bits"]) == {"a", "b"}


def test_dense_model_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="no router loss"):
        tune_teacher(dense, _data(), CFG, tmp_path, torch.device("cpu"))


def test_autocast_experts_match_transformers_path_and_train_fp32_masters() -> None:
    """Under bf16 autocast the expert weights are cast for the matmuls (the gradients still reach the fp32
    weights in fp32); the outputs and gradients match transformers' own path run on bf16-rounded weights."""
    from teachers import autocast_experts

    autocast_experts.register()
    ids = _data(2, 16).long()
    grads = {}
    for impl in ("grouped_mm", autocast_experts.NAME):
        model = _teacher()
        add_expert_noise(model, 0.05, seed=0)
        if impl == "grouped_mm":  # the reference: weights rounded to bf16 as the cast does, maths in fp32
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".experts." in name:
                        p.copy_(p.to(torch.bfloat16).float())
        model.set_experts_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        w = model.model.layers[0].mlp.experts.gate_up_proj
        assert w.dtype == torch.float32 and w.grad.dtype == torch.float32
        grads[impl] = (out.loss.detach(), w.grad.clone())
    (l0, g0), (l1, g1) = grads.values()
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g1, g0, rtol=5e-2, atol=5e-3 * g0.abs().max().item())


def test_balance_loss_per_layer_sees_what_pooling_hides() -> None:
    """Pooled over layers (transformers' form) it equals transformers' loss; per layer it catches two layers
    that each send every token to one expert, which pooled looks perfectly even."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from teachers.continued_training import balance_loss

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(64, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(balance_loss(logits, 2, per_layer=False), load_balancing_loss_func(logits, 4, 2))
    # Layer 0 prefers experts 0 and 1, layer 1 experts 2 and 3: pooled, each expert gets half the tokens of
    # one layer, which is even; per layer each layer uses only two of its four experts.
    skewed = (torch.tensor([[4.0, 4.0, -4.0, -4.0]]).repeat(64, 1), torch.tensor([[-4.0, -4.0, 4.0, 4.0]]).repeat(64, 1))
    pooled, per_layer = balance_loss(skewed, 2, per_layer=False), balance_loss(skewed, 2, per_layer=True)
    assert pooled == pytest.approx(2.0, abs=1e-2)  # the floor: top_k
    assert per_layer == pytest.approx(4.0, abs=1e-2)  # every assignment on experts holding all the probability
