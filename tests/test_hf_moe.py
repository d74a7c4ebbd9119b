"""`fused_triton` inside transformers: whole tiny models of four MoE architectures give eager's logits."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from kernels.hf_moe import enable_fused_moe, fused_triton_experts_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)

CONFIGS = {
    "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": lambda: OlmoeConfig(**SMALL, intermediate_size=24, num_experts=16, num_experts_per_tok=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24, num_experts=12,
                                       num_experts_per_tok=4, norm_topk_prob=True, head_dim=12),
    "deepseek_v3": lambda: DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
                                            n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                            n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None,
                                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                            v_head_dim=12, routed_scaling_factor=2.0),
}


def _model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # routers start at zero in some architectures: give them real preferences
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3 if "gate" in n.split(".")[-2:][0] else 0.05)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return model.to(DEV).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_model_matches_eager(name: str) -> None:
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = _model(name, dtype)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    summary = enable_fused_moe(model)
    assert summary["routers_fused"] == model.config.num_hidden_layers and not summary["routers_unrecognised"]
    with torch.no_grad():
        out = model(input_ids=ids).logits.double()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err


def test_unsupported_case_falls_back_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("mixtral", torch.float32)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 48, device=DEV)
    idx = torch.randint(0, 8, (5, 2), device=DEV)
    w = torch.rand(5, 2, device=DEV)
    ref = torch.ops.aten.clone(fused_triton_experts_forward(experts, x, idx, w))
    experts.has_post_expert_norm = True  # a case we do not cover
    experts.post_expert_norm = torch.nn.Identity()
    enable_fused_moe(model)  # the structure changed: the cached verdict is worked out again
    with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
        out = fused_triton_experts_forward(experts, x, idx, w)
    assert "post-expert norm" in caplog.text and "grouped_mm" in caplog.text
    # fp32 inputs: our dots and cuBLAS's may both use tf32-class arithmetic on GPU
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3


def test_dense_model_is_refused() -> None:
    from transformers import LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL, intermediate_size=32))
    with pytest.raises(ValueError, match="experts interface"):
        enable_fused_moe(dense)
