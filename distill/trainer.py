"""Train a dense student on a cached top-k teacher distribution, resumable from checkpoints.

The loop reads top to bottom: order the data, then per optimizer step accumulate micro-batches, clip,
step, log, and every `checkpoint_every` steps save everything needed to continue as if never stopped. The
data order is a function of (seed, epoch) alone, so a resumed run sees the same batches.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from distill.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from distill.topk_kd_loss import distillation_loss
from pipelines.config import DistillConfig

LogFn = Callable[[dict[str, float], int], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to 10% of it."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _collate(items: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def total_steps(num_sequences: int, cfg: DistillConfig) -> int:
    per_epoch = num_sequences // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the cache holds {num_sequences} sequences, fewer than distill.batch_size="
                         f"{cfg.batch_size}: lower the batch size or raise data.train_tokens")
    return cfg.max_steps or per_epoch * cfg.epochs


def train_student(student: torch.nn.Module, dataset: torch.utils.data.Dataset, cfg: DistillConfig,
                  ckpt_dir: Path, vocab_size: int, device: torch.device,
                  log_fn: LogFn | None = None) -> dict[str, float]:
    """Distil into `student` in place; resumes from the newest checkpoint in `ckpt_dir` if there is one.

    dataset items: input_ids [S], topk_ids [S, k], topk_logprobs [S, k], tail_logmass [S].
    Returns a summary (steps, tokens, final loss/kd/ce, seconds).
    """
    torch.manual_seed(cfg.seed)
    student.to(device).train()
    n = len(dataset)
    steps = total_steps(n, cfg)
    per_epoch = n // cfg.batch_size
    accum = cfg.batch_size // cfg.micro_batch_size
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, steps))
    start, tokens, seconds, last = 0, 0, 0.0, {}
    ckpts = list_checkpoints(ckpt_dir)
    if ckpts:
        state = load_checkpoint(ckpts[-1], student, opt, sched)
        start, tokens, seconds, last = state["step"], state["tokens"], state["seconds"], state["last"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    bar = tqdm(range(start, steps), desc="distill", initial=start, total=steps, unit="step")
    for step in bar:
        t0 = time.perf_counter()
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(n, cfg.seed, epoch)
        batch_ids = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        step_tokens = 0
        for m in range(accum):
            mb = _collate([dataset[i] for i in batch_ids[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]],
                          device)
            ids = mb["input_ids"]
            with autocast:
                logits = student(input_ids=ids).logits[:, :-1, :vocab_size]
            labels = ids[:, 1:].reshape(-1)
            out = distillation_loss(logits.reshape(-1, logits.shape[-1]), labels,
                                    mb["topk_ids"][:, :-1].reshape(-1, mb["topk_ids"].shape[-1]),
                                    mb["topk_logprobs"][:, :-1].reshape(-1, mb["topk_logprobs"].shape[-1]),
                                    mb["tail_logmass"][:, :-1].reshape(-1), cfg.kd_weight, cfg.ce_weight,
                                    cfg.temperature)
            if not torch.isfinite(out["loss"]):
                good = list_checkpoints(ckpt_dir)
                raise NonFiniteLossError(
                    f"loss is {out['loss'].item()} at step {step} (kd {out['kd'].item()}, ce {out['ce'].item()}); "
                    f"last good checkpoint: {good[-1] if good else 'none'}. Lower distill.lr or check the cache.")
            (out["loss"] / accum).backward()
            for k in sums:
                sums[k] += out[k].item() / accum
            step_tokens += labels.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens += step_tokens
        seconds += dt
        last = {**sums, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], "tokens_per_s": step_tokens / dt}
        bar.set_postfix(loss=f"{sums['loss']:.3f}", kd=f"{sums['kd']:.3f}", ce=f"{sums['ce']:.3f}")
        if log_fn:
            log_fn(last, step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(ckpt_dir, step + 1, student, opt, sched,
                            {"tokens": tokens, "seconds": seconds, "last": last})
    student.eval()
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "final_loss": last.get("loss", float("nan")),
            "final_kd": last.get("kd", float("nan")), "final_ce": last.get("ce", float("nan"))}
