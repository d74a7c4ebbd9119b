"""Continued training of an MoE teacher before it labels anything: what makes an upcycled teacher's experts differ.

Sparse upcycling copies one dense MLP into every expert, so the upcycled model computes the dense function
and its experts have nothing to specialise in. Training it further on the text, with

- the load-balancing loss of Switch Transformer (E x sum_e f_e P_e: top_k when the load is perfectly even,
  more when it is not), weighted by `aux_loss_coef`, which keeps every expert in use so that each sees its
  own tokens. It is taken per MoE layer and averaged (`balance_loss`). transformers' Mixtral-family loss
  pools the tokens of all layers first, which only balances each expert's load summed over the layers: a
  first run that way (PRESET=h100, 2026-11-24) ended with that pooled loss at its floor, 2.000, while the
  per-layer load still varied with a coefficient of variation of 0.45;
- optional multiplicative router jitter (Mixtral's `router_jitter_noise`) during training;
- optional noise on the expert copies before the first step (`expert_noise`, relative to each weight's std),
  which breaks their symmetry at once instead of waiting for routing to do it,

lets the experts drift apart. `expert_spread` measures how far: per MoE layer, the mean relative distance
between two experts' weights (0 for exact copies). The routing before and after is measured with the same
counters as the logit cache's router analytics (`teachers.router_analytics`).

The step loop is the student's too (core/training_loop.py): resumable exactly (checkpoints every
`checkpoint_every` steps, the data order a function of the seed, the RNG saved), a NaN loss stopped with the
last good checkpoint named, a clean stop at the time limit (`core.deadline`). This file gives it one step's
micro-batch work. fp32 master weights; on GPU the forward runs under bf16 autocast.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from core.training_loop import LogFn, LoopSettings, lr_lambda, run_training, steps_per_epoch
from teachers.config import TeacherTuneConfig
from teachers.router_analytics import RouterRecorder, summarise


def expert_spread(model: torch.nn.Module) -> list[float]:
    """Per MoE layer: mean over expert pairs of ||W_i - W_j|| / mean ||W||, over all of the experts' stacked
    weights (3-D parameters [E, ...] of an `experts` module). 0 means the experts are exact copies."""
    spreads = []
    for name, module in model.named_modules():
        if not name.endswith("experts"):
            continue
        stacked = [p.detach().float().flatten(1) for p in module.parameters(recurse=False) if p.dim() == 3]
        if not stacked:
            continue
        w = torch.cat(stacked, dim=1)  # [E, all weights of one expert]
        e = w.shape[0]
        if e < 2:
            continue
        dist = torch.cdist(w[None], w[None])[0]  # [E, E]
        mean_pair = dist.sum() / (e * (e - 1))
        spreads.append(float(mean_pair / w.norm(dim=1).mean().clamp_min(1e-12)))
    return spreads


@torch.no_grad()
def add_expert_noise(model: torch.nn.Module, relative_std: float, seed: int) -> int:
    """Add N(0, (relative_std * std(W_e))^2) to every expert's weights, independently per expert; returns the
    number of (tensor, expert) slices changed. Deterministic in `seed`."""
    if relative_std <= 0:
        return 0
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for name, p in model.named_parameters():
        if ".experts." not in name or p.dim() != 3:
            continue
        for e in range(p.shape[0]):
            noise = torch.randn(p[e].shape, generator=g, dtype=torch.float32)
            p[e].add_((noise * relative_std * p[e].float().std().cpu()).to(p.device, p.dtype))
            changed += 1
    return changed


def set_router_jitter(model: torch.nn.Module, jitter: float) -> int:
    """Set the training-time router jitter of every MoE block that has one (Mixtral-style `jitter_noise`);
    returns how many blocks took it. Raises ConfigError if jitter > 0 and the architecture has none."""
    blocks = [m for m in model.modules() if hasattr(m, "jitter_noise")]
    if jitter > 0 and not blocks:
        raise ConfigError(f"teacher_tune.router_jitter={jitter}: the {model.config.model_type} architecture has no "
                          "router jitter (Mixtral-style jitter_noise); set it to 0")
    for m in blocks:
        m.jitter_noise = jitter
    return len(blocks)


@torch.no_grad()
def measure_routing(model: torch.nn.Module, sequences: torch.Tensor, source_ids: torch.Tensor,
                    sources: list[str], batch_size: int = 8) -> dict[str, Any]:
    """Router analytics (`router_analytics.summarise`: load balance, entropy, specialisation by source) of
    `model` on sequences [N, S] whose sources are source_ids [N] (indices into `sources`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with RouterRecorder(model, sources) as rec:
            for i in range(0, len(sequences), batch_size):
                ids = sequences[i:i + batch_size].long().to(device)
                rec.set_batch(source_ids[i:i + batch_size], ids.shape[1])
                with _autocast(device):
                    model(input_ids=ids, use_cache=False)
        return summarise(rec.counts, rec.layers, sources)
    finally:
        model.train(was_training)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, per_layer: bool = True) -> torch.Tensor:
    """Switch Transformer's load-balancing loss from softmax routers' logits, one [T, E] tensor per MoE layer:
    E x sum_e f_e P_e, with f_e the share of the T x top_k assignments that go to expert e (times top_k, so the
    shares sum to top_k) and P_e the mean router probability of e. Per layer and averaged (`per_layer`), or
    over the tokens of all layers pooled, which is transformers' `load_balancing_loss_func`. Scalar; top_k
    when every expert gets an equal share."""
    pooled = [torch.cat(router_logits)] if not per_layer else list(router_logits)
    losses = []
    for logits in pooled:
        probs = logits.float().softmax(-1)  # [T, E]
        experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
        share = torch.zeros(experts, device=probs.device).index_add_(
            0, chosen, torch.ones_like(chosen, dtype=torch.float32)) / probs.shape[0]
        losses.append(experts * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())


def _bf16_experts(model: torch.nn.Module) -> dict[str, Any] | None:
    """Switch the experts to `grouped_mm_autocast`; returns the implementation to restore (None: cannot)."""
    from teachers import autocast_experts

    if not hasattr(model, "set_experts_implementation") or not model._can_set_experts_implementation():
        return None
    before = model.get_experts_implementation()
    autocast_experts.register()
    model.set_experts_implementation(autocast_experts.NAME)
    return before


def tune_teacher(model: torch.nn.Module, sequences: torch.Tensor, cfg: TeacherTuneConfig, ckpt_dir: Path,
                 device: torch.device, log_fn: LogFn | None = None) -> dict[str, Any]:
    """Train `model` (an MoE causal LM, fp32) in place on sequences [N, S] (token ids) for cfg.steps optimizer
    steps of cfg.batch_size sequences: next-token cross-entropy plus cfg.aux_loss_coef x the load-balancing
    loss. Resumes from the newest checkpoint in `ckpt_dir`; raises `deadline.TimeLimitReached` (after saving a
    checkpoint) when the invocation's time limit is near, NonFiniteLossError when the loss is NaN or inf.
    Returns the summary (steps, tokens, seconds, tokens/s, final ce and aux loss)."""
    cfg.validate()
    if not hasattr(model.config, "output_router_logits"):
        raise ConfigError(f"teacher_tune: the {model.config.model_type} architecture has no router loss "
                          "(output_router_logits); set teacher_tune.steps=0")
    steps_per_epoch(len(sequences), cfg.batch_size, "teacher_tune")  # before any work: the data must hold a step
    torch.manual_seed(cfg.seed)
    # transformers adds its own pooled `router_aux_loss_coef` x aux to the loss it returns; zero it there and
    # add ours (`balance_loss`), so the form and the weight are always ours.
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = 0.0
    top_k = model.config.num_experts_per_tok
    per_layer = cfg.balance == "per_layer"
    set_router_jitter(model, cfg.router_jitter)
    model.to(device).train()
    restore = _bf16_experts(model) if device.type == "cuda" and cfg.expert_matmul == "bf16" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))

    def step(_index: int, micro_batches: list[list[int]]) -> tuple[dict[str, float], int]:
        """Forward and backward of the step's micro-batches; their mean ce, aux and objective ("loss")."""
        accum = len(micro_batches)
        sums = torch.zeros(2, device=device)
        for items in micro_batches:
            ids = sequences[items].long().to(device)
            with _autocast(device):
                out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
            aux = balance_loss(out.router_logits, top_k, per_layer)
            ((out.loss + cfg.aux_loss_coef * aux) / accum).backward()
            sums += torch.stack([out.loss.detach().float(), aux.detach()]) / accum
        ce, aux = sums.tolist()  # one host sync per step
        step_tokens = sum(len(items) for items in micro_batches) * sequences.shape[1]
        return {"loss": ce + cfg.aux_loss_coef * aux, "ce": ce, "aux": aux}, step_tokens

    loop = LoopSettings("teacher_tune", cfg.steps, cfg.batch_size, cfg.micro_batch_size, cfg.seed, cfg.grad_clip,
                        cfg.checkpoint_every)
    # Noise on the expert copies only on a fresh start: a resumed run's experts come from its checkpoint.
    done = run_training(step, len(sequences), loop, model, opt, sched, ckpt_dir, torch.nn.utils.clip_grad_norm_,
                        log_fn=log_fn, on_fresh_start=lambda: add_expert_noise(model, cfg.expert_noise, cfg.seed),
                        shown=("ce", "aux"))
    if restore is not None:
        model.set_experts_implementation(restore)  # what it was: the saved config must not name ours
    model.eval()
    return {**done.counters(), **done.final(("ce", "aux"))}
