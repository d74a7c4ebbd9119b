"""Whether a causal LM's logits are just its last hidden state times its output matrix.

When they are, the [tokens, vocab] logits never need to exist at once: the distillation loss fuses the head
with the loss (distill/fused_linear_kd.py) and the logits stage takes the teacher's top-k chunk by chunk
(logit_cache.topk_from_hidden). Models that post-process their logits (Gemma 2's soft-capping, Cohere's
scale) or give the head a bias are not plain; neither is a head wrapped with LoRA adapters.
"""
from __future__ import annotations

import torch


def plain_head_problem(model: torch.nn.Module) -> str | None:
    """Why `model`'s (or a peft wrapper's base model's) output layer is not a plain bias-free linear map with
    nothing applied after it; None when it is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    cfg = base.config
    if getattr(head, "bias", None) is not None:
        return "its output layer has a bias"
    if not isinstance(head, torch.nn.Linear) and not hasattr(head, "base_layer"):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        return "it rescales or soft-caps its logits"
    if hasattr(head, "base_layer"):
        return "its output layer has LoRA adapters"
    return None
