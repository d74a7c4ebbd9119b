"""STUDENT=derived beyond the families named anywhere in the code: a tiny teacher of each MoE family in
transformers is either derived into its own architecture made dense (the switch found by trying, the FFN
weights found by structure) and, with identical experts, reproduces the teacher's logits exactly; or it is
refused by `check_derivable`, before any weights are loaded, with the fix (STUDENT=<dense model>)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, logging

from core.errors import UnsupportedModelError, UserError
from students.dense_switch import dense_config, find_dense_switch
from students.dense_twin import check_derivable
from students.derive import derive_dense_student
from students.ffn_layout import layer_ffn
from students.routing_stats import routing_stats
from teachers.moe_layout import decoder_layers

logging.set_verbosity_error()  # tiny vocabularies put the families' default special tokens out of range

E, H, W = 4, 32, 16  # experts, hidden size, expert width
_COMMON = dict(vocab_size=128, hidden_size=H, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, max_position_embeddings=64, num_experts_per_tok=2, moe_intermediate_size=W,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")  # each family's name for E
_MLA = dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)

# model_type -> (config fields, routing). A teacher with a dense first layer as wide as a derived layer (routed
# width + shared width: copied unchanged, not cut). Routing, so that the experts' total weight is the same for
# every token (identical experts then compute a dense function): "renorm": random routers, top-k weights
# renormalised; "flat": zeroed routers, every expert weighted alike (top-k of E equal weights, not renormalised);
# "zero": Llama 4 scales the experts' *input* by the router score (not linear through SwiGLU), so its routed
# experts are zeroed and the check covers attention, the shared expert and the dense layers.
DERIVED = {
    "afmoe": ({"num_dense_layers": 1, "num_shared_experts": 1, "intermediate_size": 2 * W}, "renorm"),
    "cohere2_moe": ({"intermediate_size": W}, "renorm"),
    "deepseek_v2": ({**_MLA, "first_k_dense_replace": 1, "n_shared_experts": 1, "intermediate_size": 2 * W,
                     "topk_method": "greedy"}, "flat"),
    "dots1": ({"first_k_dense_replace": 1, "n_shared_experts": 1, "intermediate_size": 2 * W,
               "norm_topk_prob": True, "n_group": 1, "topk_group": 1}, "renorm"),
    "ernie4_5_moe": ({"moe_layer_start_index": 1, "moe_num_shared_experts": 1, "intermediate_size": 2 * W},
                     "renorm"),
    "exaone_moe": ({"first_k_dense_replace": 1, "mlp_layer_types": None, "num_shared_experts": 1,
                    "intermediate_size": 2 * W, "norm_topk_prob": True}, "renorm"),
    "glm4_moe_lite": ({**_MLA, "mlp_layer_types": ["dense", "sparse", "sparse"], "n_shared_experts": 1,
                       "intermediate_size": 2 * W, "norm_topk_prob": True, "n_group": 1, "topk_group": 1}, "renorm"),
    "glm4_moe": ({"first_k_dense_replace": 1, "n_shared_experts": 1, "intermediate_size": 2 * W,
                  "norm_topk_prob": True, "n_group": 1, "topk_group": 1}, "renorm"),
    "lfm2_moe": ({"num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv"],
                  "intermediate_size": W, "norm_topk_prob": True}, "renorm"),
    "llama4_text": ({"interleave_moe_layer_step": 2, "moe_layers": None, "no_rope_layers": None,
                     "num_experts_per_tok": 1, "intermediate_size": W, "intermediate_size_mlp": 2 * W,
                     "attention_chunk_size": 16}, "zero"),
    "qwen3_next": ({"mlp_only_layers": [0], "shared_expert_intermediate_size": 24, "intermediate_size": W + 24,
                    "norm_topk_prob": True, "layer_types": ["linear_attention", "full_attention", "linear_attention"],
                    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                    "linear_value_head_dim": 8}, "renorm"),
}
# model_type -> config fields: families whose config cannot make their own layers dense and which have no dense
# relative in transformers (or whose experts carry biases: GPT-OSS, JetMoE).
REFUSED = {
    "gpt_oss": {}, "jetmoe": {"kv_channels": 8}, "minimax": {"layer_types": ["full_attention"] * 3}, "minimax_m2": {},
    "olmoe": {}, "phimoe": {},
}
# Refused until the dense-relative search (students/dense_relative.py): derived into the family it finds.
RELATIVES = {"flex_olmo": "olmo2", "granitemoe": "granite", "hunyuan_v1_moe": "hunyuan_v1_dense",
             "solar_open": "mistral"}


def _config(model_type: str, fields: dict) -> object:
    cfg = AutoConfig.for_model(model_type, **{**_COMMON, **fields})
    for k in _COUNTS:
        if k in cfg.to_dict():
            setattr(cfg, k, E)
    return cfg


def _teacher(model_type: str) -> PreTrainedModel:
    fields, routing = DERIVED[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type, fields)).eval()
    with torch.no_grad():
        prefix, layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            lay = layer_ffn(layer, H, f"{prefix}.{i}")
            if lay.experts is None:
                continue
            block = layer.get_submodule(lay.path)
            experts = block.get_submodule(lay.experts.path)
            for name in (lay.experts.gate_up, lay.experts.down):
                p = getattr(experts, name)
                p.copy_(p[:1].expand_as(p) if routing != "zero" else torch.zeros_like(p))
            if lay.shared_gate is not None:  # a sigmoid gate on the shared expert: a constant 0.5, so it is exact
                block.get_submodule(lay.shared_gate).weight.zero_()
            for name, p in block.named_parameters():  # the routers: weights [E, H]
                if p.dim() == 2 and p.shape == (E, H):
                    p.copy_(torch.randn(E, H) * 0.5 if routing == "renorm" else torch.zeros(E, H))
    return model


@pytest.mark.parametrize("model_type", sorted(DERIVED))
def test_a_family_with_a_dense_switch_is_derived_into_its_own_dense_architecture(model_type: str,
                                                                                 tmp_path: Path) -> None:
    teacher = _teacher(model_type)
    line = check_derivable(teacher.config)
    assert line.startswith(f"{model_type} with every layer dense"), line
    ids = torch.randint(3, 128, (2, 9))
    try:
        stats = routing_stats(teacher, ids.split(1))
    except (AttributeError, UnsupportedModelError):  # routing not readable (Llama 4 scores): no shared gate here
        stats = None
    student = derive_dense_student(teacher, keep_layers="all", method="frequency", stats=stats)
    assert student.config.model_type == teacher.config.model_type
    assert not any(p.dim() == 3 for n, p in student.named_parameters() if "conv" not in n)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref, out, again = teacher(ids).logits, student(ids).logits, reloaded(ids).logits
    assert torch.allclose(ref, out, atol=1e-4), (model_type, (ref - out).abs().max())
    assert torch.allclose(out, again, atol=1e-6)
    # Fewer layers: per-layer settings (layer types, dense-layer lists) follow the kept layers.
    short = derive_dense_student(teacher, keep_layers="1,2", stats=stats)  # keeps an attention layer
    assert short.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(short(ids).logits).all()


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_a_family_without_dense_layers_is_refused_before_any_weights_load(model_type: str) -> None:
    cfg = _config(model_type, REFUSED[model_type])
    with pytest.raises(UnsupportedModelError, match=f"'?{model_type}'?.*STUDENT=<dense model") as err:
        check_derivable(cfg)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_the_switch_is_a_rule_applied_to_the_students_own_depth() -> None:
    cfg = _config("glm4_moe", DERIVED["glm4_moe"][0])
    sw = find_dense_switch(cfg)
    assert sw is not None and (sw.field, sw.rule, sw.width_field) == ("first_k_dense_replace", "depth",
                                                                       "intermediate_size")
    two = dense_config(cfg, sw, [0, 2], 24)
    assert (two.num_hidden_layers, two.first_k_dense_replace, two.intermediate_size) == (2, 2, 24)
    exa = dense_config(_config("exaone_moe", DERIVED["exaone_moe"][0]), *_switch("exaone_moe"), [1, 2], 24)
    assert exa.mlp_layer_types == ["dense", "dense"] and len(exa.layer_types) == 2
    # The relatives stay preferred where they exist: Mixtral -> Llama, Qwen3-MoE -> Qwen3.
    assert check_derivable(AutoConfig.for_model("qwen3_moe", **{**_COMMON, "num_experts": E})).startswith("qwen3 ")


def _switch(model_type: str) -> tuple:
    sw = find_dense_switch(_config(model_type, DERIVED[model_type][0]))
    assert sw is not None
    return (sw,)


def test_transposed_experts_are_read_in_the_gate_up_layout() -> None:
    """Llama 4 stores experts as [E, H, 2W] / [E, W, H]; read back as [E, 2W, H] / [E, H, W], they compute
    what the family's own experts module computes."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_config("llama4_text", DERIVED["llama4_text"][0])).eval()
    prefix, layers = decoder_layers(model)
    lay = layer_ffn(layers[1], H, f"{prefix}.1")
    assert lay.experts is not None and lay.experts.transposed and list(lay.shared) == ["shared_expert"]
    block = layers[1].get_submodule(lay.path)
    experts = block.get_submodule(lay.experts.path)
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj):
            p.normal_(0, 0.3)
        gu, dn = lay.experts.read(block)
        x = torch.randn(E * 3, H)  # 3 tokens for each expert, expert-major as the module expects
        out = experts(x).reshape(E, 3, H)
        xe = x.reshape(E, 3, H)
        ref = torch.einsum("eth,ehw->etw", torch.nn.functional.silu(xe @ gu[:, :W].transpose(1, 2))
                           * (xe @ gu[:, W:].transpose(1, 2)), dn.transpose(1, 2))
    assert torch.allclose(out, ref, atol=1e-5)


def test_experts_with_another_activation_are_refused_not_merged_as_swiglu() -> None:
    cfg = _config("glm4_moe", {**DERIVED["glm4_moe"][0], "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="is not SiLU.*STUDENT=<dense model"):
        check_derivable(cfg)
