"""The loss of one micro-batch: student forward, teacher targets (cached or online), KD + CE, hidden alignment.

The student is run up to its final hidden states; the output layer and the loss are one fused step
(distill/fused_linear_kd.py) whenever the output layer is a plain bias-free linear map, so [tokens, vocab]
logits never exist. Models that post-process logits (soft-capping, scaling) or carry a bias take the
unfused path, which applies the model's own head.

Teacher targets come either from the cache (batch keys topk_ids, topk_logprobs, tail_logmass, [B, S, k]) or
from a teacher forward here ("online"); online, the teacher's top-k is taken on the fly (fused) or its full
logits are used (online_top_k = 0, unfused, memory grows with the vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.fused_linear_kd import fused_linear_topk_kd
from distill.kd_losses import KDLossSpec, full_kd_loss, topk_kd_loss
from distill.layer_transfer import LayerTap, layer_loss
from logit_cache import topk_from_logits
from teachers.moe_layout import decoder_module
from teachers.output_head import plain_head_problem


@dataclass
class StudentParts:
    """The pieces of a causal LM the loss needs, found once."""
    model: torch.nn.Module  # the whole model (a PeftModel or the plain HF model)
    decoder: torch.nn.Module  # embeddings + layers + final norm: input_ids -> last_hidden_state
    head: torch.nn.Module  # output layer
    fusable: bool  # whether the head is a bias-free linear with nothing applied after it


def student_parts(model: torch.nn.Module, fused: str = "auto") -> StudentParts:
    """Locate decoder and head of an HF causal LM (or a peft wrapper of one); decide the fused path.

    fused: "auto" (fused when possible), "on" (error when not possible), "off".
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    why_not = plain_head_problem(model)
    if fused == "on" and why_not:
        raise ValueError(f"distill.fused_loss=on, but the student cannot use the fused loss: {why_not}; "
                         "use distill.fused_loss=auto or off")
    return StudentParts(model, decoder_module(base), head, fused != "off" and why_not is None)


@dataclass
class LayerTerm:
    """Layer-wise transfer in the loss: hooks on every student decoder layer, the loss's weight and kind."""
    tap: LayerTap
    weight: float
    kind: str = "mse"


@dataclass
class BatchTargets:
    """Teacher targets for the N = B * (S - 1) predicted positions."""
    labels: torch.Tensor  # [N]
    topk_ids: torch.Tensor | None = None  # [N, k]
    topk_logprobs: torch.Tensor | None = None  # [N, k]
    tail_logmass: torch.Tensor | None = None  # [N]
    logits: torch.Tensor | None = None  # [N, V] (online, full vocabulary)
    hidden: torch.Tensor | None = None  # [N, H_teacher] (online, for hidden alignment)
    layers: list[torch.Tensor] | None = None  # per student layer, its teacher layer's output [B, S, H] (online)
    # The predicted positions (rows of the B * (S - 1)) the loss is taken on, when not all of them: on an
    # on-policy step, the student's sampled tokens (distill/on_policy.py); the per-token fields above then hold
    # these rows only.
    rows: torch.Tensor | None = None  # [N'] int64


def cached_targets(batch: dict[str, torch.Tensor]) -> BatchTargets:
    """Targets from a batch of the top-k cache: input_ids [B, S], topk_* [B, S, k], tail_logmass [B, S]."""
    k = batch["topk_ids"].shape[-1]
    return BatchTargets(batch["input_ids"][:, 1:].reshape(-1), batch["topk_ids"][:, :-1].reshape(-1, k),
                        batch["topk_logprobs"][:, :-1].reshape(-1, k), batch["tail_logmass"][:, :-1].reshape(-1))


@torch.no_grad()
def online_targets(teacher: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int, top_k: int,
                   want_hidden: bool, rows: torch.Tensor | None = None) -> BatchTargets:
    """Targets from a teacher forward on input_ids [B, S]; top_k = 0 keeps the full logits [N, vocab_size].
    `rows` [N'] (indices of the N = B * (S - 1) predicted positions): targets at those positions only."""
    out = teacher(input_ids=input_ids, output_hidden_states=want_hidden)
    logits = out.logits[:, :-1, :vocab_size].reshape(-1, vocab_size)
    labels = input_ids[:, 1:].reshape(-1)
    if rows is not None:  # before the top-k: no work on positions that carry no loss
        logits, labels = logits[rows], labels[rows]
    t = BatchTargets(labels, rows=rows)
    if top_k:
        t.topk_ids, t.topk_logprobs, t.tail_logmass = topk_from_logits(logits, min(top_k, vocab_size))
    else:
        t.logits = logits
    if want_hidden:
        h = out.hidden_states[-1][:, :-1]
        t.hidden = h.reshape(-1, h.shape[-1]) if rows is None else h.reshape(-1, h.shape[-1])[rows]
    return t


def batch_loss(parts: StudentParts, input_ids: torch.Tensor, targets: BatchTargets, spec: KDLossSpec,
               vocab_size: int, projection: torch.nn.Module | None = None,
               hidden_weight: float = 0.0, layers: LayerTerm | None = None) -> dict[str, torch.Tensor]:
    """loss (differentiable), kd, ce and, with hidden alignment, hidden (detached) for input_ids [B, S].

    Hidden alignment adds hidden_weight * MSE(projection(student last hidden), teacher last hidden), both
    taken after the final norm; `projection` maps the student's width to the teacher's (identity if None).
    Layer-wise transfer (`layers`) adds its weight * the distance between each student layer's output and
    its teacher layer's (`targets.layers`; distill/layer_transfer.py), reported as `layers`. With
    `targets.rows` only those predicted positions count.
    """
    if layers is not None:
        layers.tap.clear()
    emb = parts.decoder.get_input_embeddings()(input_ids)
    dev = emb.device.type
    if torch.is_autocast_enabled(dev):
        # fp32 master weights give an fp32 embedding, and the residual stream would stay fp32 through every
        # layer (autocast only touches matmuls): twice the bytes in every norm and add. Starting it in bf16 is
        # what bf16 training does anyway; norms still compute in fp32 inside.
        emb = emb.to(torch.get_autocast_dtype(dev))
    hs = parts.decoder(inputs_embeds=emb).last_hidden_state[:, :-1]
    hs = hs.reshape(-1, hs.shape[-1])
    if targets.rows is not None:
        hs = hs[targets.rows]
    if targets.logits is None and parts.fusable:
        out = fused_linear_topk_kd(hs, parts.head.weight[:vocab_size], targets.labels, targets.topk_ids,
                                   targets.topk_logprobs, targets.tail_logmass, spec)
    else:
        logits = parts.head(hs)
        scale = getattr(parts.decoder.config, "logit_scale", None)  # Cohere
        if scale:
            logits = logits * scale
        cap = getattr(parts.decoder.config, "final_logit_softcapping", None)  # Gemma 2
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logits = logits[:, :vocab_size]
        if targets.logits is not None:
            out = full_kd_loss(logits, targets.logits, targets.labels, spec)
        else:
            out = topk_kd_loss(logits, targets.labels, targets.topk_ids, targets.topk_logprobs, targets.tail_logmass,
                               spec)
    if hidden_weight > 0:
        if targets.hidden is None:
            raise ValueError("hidden alignment needs the teacher's hidden states (online teacher mode)")
        proj = hs if projection is None else projection(hs)
        mse = torch.nn.functional.mse_loss(proj.float(), targets.hidden.float())
        out = {**out, "loss": out["loss"] + hidden_weight * mse, "hidden": mse.detach()}
    if layers is not None:
        if targets.layers is None:
            raise ValueError("layer-wise transfer needs the teacher's layer outputs (online teacher mode)")
        term = layer_loss(layers.tap.taken(), targets.layers, layers.kind)
        out = {**out, "loss": out["loss"] + layers.weight * term, "layers": term.detach()}
    return out
