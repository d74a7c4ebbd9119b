"""Whether a causal LM's logits are just its last hidden state times its output matrix.

When they are, the [tokens, vocab] logits never need to exist at once: the distillation loss fuses the head
with the loss (distill/fused_linear_kd.py) and the logits stage takes the teacher's top-k chunk by chunk
(logit_cache.topk_from_hidden). Models that post-process their logits (Gemma 2's soft-capping, Cohere's
scale) or give the head a bias are not plain; neither is a head wrapped with LoRA adapters.

Config fields name only some of the ways a family post-processes its logits (Granite's `logits_scaling`
divides them, Inkling scales the hidden state by `logits_mup_width_multiplier` before the head), so the
answer is also measured: one forward of a few tokens, in eval mode and unseen by anyone else's hooks, must
feed the output layer the decoder's last hidden state and return the output layer's result as the logits.
"""
from __future__ import annotations

from typing import Any

import torch

from kernels.module_hooks import hooks_set_aside

_PROBE_TOKENS = 8
# A family that transforms its logits changes them by far more than this (relative, whole tensor); the same
# forward's tensors compared with themselves agree exactly.
_TOLERANCE = 1e-4


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
    return _measured_problem(model, base, head)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def _measured_problem(model: torch.nn.Module, base: torch.nn.Module, head: torch.nn.Module) -> str | None:
    """Why one forward of a few tokens shows the logits are not head(decoder's last hidden state); None when
    they are, or when nothing can be run (a model on the meta device, no separate decoder module)."""
    from teachers.moe_layout import decoder_module

    emb = base.get_input_embeddings()
    weight = getattr(head, "weight", None)
    emb_params = list(emb.parameters()) if emb is not None else []
    if weight is None or not emb_params or emb_params[0].device.type == "meta" or weight.device.type == "meta":
        return None
    decoder = decoder_module(base)
    if decoder is base:
        return None
    seen: dict[str, Any] = {}
    vocab = min(int(weight.shape[0]), int(emb_params[0].shape[0]))
    ids = ((torch.arange(_PROBE_TOKENS) * 7919 + 3) % vocab).unsqueeze(0).to(emb_params[0].device)
    was_training = model.training
    with hooks_set_aside(model):
        def on_decoder(_m: torch.nn.Module, _args: tuple, out: Any) -> None:  # returns None: output unchanged
            seen.setdefault("hidden", getattr(out, "last_hidden_state", None))

        def on_head(_m: torch.nn.Module, args: tuple, out: Any) -> None:
            seen.update(head_in=args[0] if args else None, head_out=out)

        decoder.register_forward_hook(on_decoder)
        head.register_forward_hook(on_head)
        model.eval()
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        finally:
            model.train(was_training)
    hidden, head_in, head_out = seen.get("hidden"), seen.get("head_in"), seen.get("head_out")
    if not isinstance(head_out, torch.Tensor) or not isinstance(head_in, torch.Tensor):
        return "its forward does not compute its logits with its output layer"
    if not isinstance(hidden, torch.Tensor) or hidden.shape != head_in.shape or _rel(head_in, hidden) > _TOLERANCE:
        return "it transforms the decoder's last hidden state before its output layer"
    if logits.shape != head_out.shape or _rel(logits, head_out) > _TOLERANCE:
        return "it rescales, soft-caps or cuts its logits after its output layer"
    return None
