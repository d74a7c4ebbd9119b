"""Sparse upcycling: turn a dense Llama-class causal LM into a Mixtral-class MoE.

Attention, norms and embeddings are copied; every expert of a layer starts as a copy of that layer's
dense MLP and the router starts at small random values. With identical experts and renormalised top-k
weights the MoE computes exactly the dense function, whatever the router says; the experts only
specialise after further training (a GPU job). A teacher made here and not trained afterwards must be
reported as such.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

# Config fields a Mixtral shares with the Llama it comes from.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
)


def upcycled_config(dense: LlamaConfig, num_experts: int, top_k: int) -> MixtralConfig:
    """The Mixtral config whose experts have the dense MLP's width."""
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ValueError("upcycling into Mixtral needs a Llama without attention/MLP biases")
    kwargs = {f: getattr(dense, f) for f in _SHARED_FIELDS if getattr(dense, f, None) is not None}
    cfg = MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                        router_aux_loss_coef=0.01, output_router_logits=False, **kwargs)
    copy_rope_settings(dense, cfg)
    return cfg


def copy_rope_settings(src: object, dst: object) -> None:
    """RoPE settings live in one dict in transformers 5 (`rope_parameters`: type, theta, scaling); carry it whole
    (setting the older `rope_theta`/`rope_scaling` attributes instead only earns a deprecation warning)."""
    rope = getattr(src, "rope_parameters", None)
    if rope is not None:
        dst.rope_parameters = dict(rope)


@torch.no_grad()
def upcycle_llama(dense: LlamaForCausalLM, num_experts: int = 4, top_k: int = 2,
                  router_init_std: float = 0.02, seed: int = 0) -> MixtralForCausalLM:
    """Build a Mixtral MoE from a dense Llama.

    Expert weights (transformers 5 fused layout): `gate_up_proj` [E, 2I, H] holds gate rows then up rows,
    `down_proj` [E, H, I]; the router `gate.weight` is [E, H].
    """
    cfg = upcycled_config(dense.config, num_experts, top_k)
    moe = MixtralForCausalLM(cfg).to(dtype=next(dense.parameters()).dtype)
    src = dense.state_dict()
    dst = moe.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in dst:
        if ".mlp." not in name:
            out[name] = src[name]
            continue
        prefix = name.split(".mlp.")[0]
        if name.endswith("mlp.gate.weight"):
            out[name] = torch.randn(dst[name].shape, generator=gen).mul_(router_init_std).to(dst[name].dtype)
        elif name.endswith("experts.gate_up_proj"):
            gate_up = torch.cat([src[f"{prefix}.mlp.gate_proj.weight"], src[f"{prefix}.mlp.up_proj.weight"]], 0)
            out[name] = gate_up.unsqueeze(0).expand(num_experts, -1, -1).clone()
        elif name.endswith("experts.down_proj"):
            out[name] = src[f"{prefix}.mlp.down_proj.weight"].unsqueeze(0).expand(num_experts, -1, -1).clone()
        else:
            raise KeyError(f"unexpected MoE parameter {name}: transformers' Mixtral layout changed")
    for name, t in out.items():
        if t.shape != dst[name].shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(dst[name].shape)}")
    moe.load_state_dict(out, strict=True)
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval()
