"""Families beyond the ones the other tests build, from tests/arch_probe.py's tiny configs: what the probe found
silently wrong or wrongly refused, fixed by structure (never by family name), stays fixed."""
from __future__ import annotations

import pytest
import torch

from core.errors import UnsupportedModelError
from tests.arch_probe import shrink


def _model(arch: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(shrink(arch)).eval()


@pytest.mark.parametrize("arch, why", [
    ("granitemoe_swa", "it rescales, soft-caps or cuts its logits after its output layer"),  # logits / logits_scaling
    ("inkling_text", "it transforms the decoder's last hidden state before its output layer"),  # hidden / a width
    ("qwen3_next", None),
])
def test_a_head_that_is_not_plain_is_found_by_a_forward_not_by_config_names(arch: str, why: str | None) -> None:
    """The chunked head of the logits stage and the fused KD loss are taken only where the logits really are
    head(decoder output): Granite's logits_scaling and Inkling's width multiplier have no name our config
    checks know, so one forward of a few tokens decides. The cache then equals a plain forward."""
    from teachers.logit_generation import _teacher_topk
    from teachers.moe_layout import decoder_module
    from teachers.output_head import plain_head_problem

    model = _model(arch)
    assert plain_head_problem(model) == why
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9))
    decoder = decoder_module(model) if why is None else None
    with torch.no_grad():
        top_ids, top_lp, _ = (t.reshape(18, -1) for t in _teacher_topk(model, decoder, ids, 8, vocab))
        want = torch.log_softmax(model(input_ids=ids).logits.float(), -1).reshape(18, vocab)
    assert torch.allclose(top_lp, want.gather(-1, top_ids), atol=1e-4)
    assert torch.allclose(top_lp.max(-1).values, want.max(-1).values, atol=1e-4)


def test_the_probe_forward_is_not_counted_by_hooks_and_keeps_the_mode() -> None:
    from teachers.output_head import plain_head_problem

    model = _model("qwen3_next").train()
    calls = []
    model.model.register_forward_hook(lambda *_: calls.append(1))
    assert plain_head_problem(model) is None
    assert calls == [] and model.training
    model.model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert calls == [1]  # the hook is still there


@pytest.mark.parametrize("arch, refused", [
    ("kimi_linear", None),  # its linear attention's A_log [1, 1, heads, 1] is not a set of experts
    ("hy_v4", r"is not silu\(gate\) \* up"),  # SwiGLU clamped at swiglu_limit, in Experts._apply_gate
    ("minimax_m3_vl_text", r"is not silu\(gate\) \* up"),  # (up + 1) * gate * sigmoid(alpha * gate)
    ("zaya", "no setting that makes every layer a dense SwiGLU FFN"),  # its MLP router is routing, not a stray weight
])
def test_derivation_reads_or_refuses_each_family_for_the_right_reason(arch: str, refused: str | None) -> None:
    from students.dense_twin import check_derivable

    cfg = shrink(arch)
    if refused is None:
        assert "every layer dense" in check_derivable(cfg)
    else:
        with pytest.raises(UnsupportedModelError, match=refused):
            check_derivable(cfg)


def test_experts_are_two_stacked_projections_not_one_many_dim_parameter() -> None:
    from teachers.moe_layout import holds_experts

    lone = torch.nn.Module()
    lone.A_log = torch.nn.Parameter(torch.zeros(1, 1, 4, 1))
    assert not holds_experts(lone)
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 16, 8))
    experts.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 8))
    assert holds_experts(experts) and holds_experts(experts, 4) and not holds_experts(experts, 5)


@pytest.mark.parametrize("arch, strategy, routed, shared, exact", [
    ("beam", None, 2.5, 1.0, 1e-3),  # routed_scaling_factor applied by the block after the experts' sum
    ("cohere2_moe", "average", 0.5, 0.5, 1e-2),  # (experts + shared expert) / 2
    ("cohere2_moe", "sum", 1.0, 1.0, 1e-2),
])
def test_a_factor_the_block_applies_after_the_router_is_measured_and_derived(arch, strategy, routed, shared,
                                                                             exact) -> None:
    """Beam scales its experts' output in the block, not in the router; Cohere2-MoE may average experts and
    shared expert: routing_stats fits the block's output as s x experts + t x shared on the calibration tokens
    (only where that is exact), so a student derived from identical experts reproduces the teacher."""
    from students.routing_stats import routing_stats
    from tests.arch_probe import _exactness

    cfg = shrink(arch)
    if strategy:
        cfg.shared_expert_combination_strategy, cfg.num_shared_experts = strategy, 1
    if arch == "beam":
        cfg.routed_scaling_factor = routed
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    stats = routing_stats(model, ids.split(1))
    moe = stats.mass.sum(-1) > 0
    norm = 1.0 if arch == "cohere2_moe" and not getattr(cfg, "norm_topk_prob", True) else None
    if norm is None:  # renormalised top-k: the masses sum to the block's factor
        assert torch.allclose(stats.mass.sum(-1)[moe], torch.full((int(moe.sum()),), routed), atol=1e-4)
    if arch == "cohere2_moe":
        assert torch.allclose(stats.shared_gate[moe], torch.full((int(moe.sum()),), shared), atol=1e-4)
    assert _exactness(model, ids) < exact


def test_experts_stored_as_rows_of_tables_are_refused_as_such() -> None:
    """Doge's experts are vectors, rows of two [E, H] tables picked by product keys: preflight names them and says
    what to do, where it used to say no decoder layer holds the experts. A family whose experts are matrices
    (and whose router is an [E, H] table too) is not taken for one."""
    from teachers.moe_layout import check_moe_layout, expert_tables

    with pytest.raises(UnsupportedModelError, match=r"rows of 2-D tables .*mlp\.down_embed.*allow_dense=true"):
        check_moe_layout(shrink("doge"))
    (note,) = check_moe_layout(shrink("doge"), allow_dense=True)  # what the setting the message names does
    assert "runs as a dense teacher" in note and "STUDENT" in note
    model = _model("qwen3_next")
    assert expert_tables(model, model.config.num_experts) == ""
    assert check_moe_layout(shrink("qwen3_next"))  # found as an MoE, notes returned


def test_allow_dense_takes_a_teacher_whose_experts_cannot_be_found(tmp_path, smollm2_tokenizer_dir) -> None:
    """The refusal above names teacher_options.allow_dense; with it, the pipeline's preflight takes the Doge
    teacher as a dense one (a note says what that means); without it, preflight refuses before any weight is
    read. (The whole pipeline on such a teacher and a dense student runs to its report: the README's architecture
    paragraph.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipelines.config import load_config
    from pipelines.preflight import preflight

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    cfg = shrink("doge")
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), 512
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "doge")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
                     ).save_pretrained(tmp_path / "student")
    for folder in ("doge", "student"):
        tok.save_pretrained(tmp_path / folder)
    for allow in (False, True):
        run_cfg = load_config("ci", f"teacher_options.allow_dense={str(allow).lower()}", teacher=str(tmp_path / "doge"),
                              student=str(tmp_path / "student"), run_name="doge")
        if not allow:
            with pytest.raises(UnsupportedModelError, match="allow_dense=true"):
                preflight(run_cfg, tmp_path / "runs" / "doge")
        else:
            notes = preflight(run_cfg, tmp_path / "runs" / "doge")
            assert any("runs as a dense teacher" in n for n in notes), notes
