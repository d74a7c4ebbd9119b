"""The one optimizer-step loop every training of the pipeline runs: the student's distillation, its cross-entropy
baseline (distill/trainer.py) and the teacher's continued training (teachers/continued_training.py).

What makes a run resumable exactly lives here, once: the data order is a function of (seed, epoch) alone
(`epoch_order`), each step's sequences are sliced the same way on every start, and a checkpoint (model,
optimizer, scheduler, RNG, counters; core/checkpoint.py) is written every `checkpoint_every` steps, at the last
step and when the time limit (core/deadline.py) stops the run. A run killed at any moment and started again
therefore logs the same losses, step for step, as one that never stopped.

What differs between trainings stays with the caller: a step function does the micro-batches' forward and
backward passes (autocast, DDP/FSDP2 syncing, the loss itself) and returns the step's averaged numbers; the
gradient clipping is passed in (accelerate's for the student, torch's for the teacher). The loop only adds
what every training needs: the NaN/inf check, clipping, the optimizer and scheduler step, the counters, the
log, the progress bar and the checkpoint cadence.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from core import deadline, interrupt
from core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from core.errors import ConfigError, UserError

LogFn = Callable[[dict[str, float], int], None]
# (the step's index from 0, the same on a resumed run; micro-batches of this process, as dataset indices in
# order) -> (the step's numbers averaged over its micro-batches and processes, with "loss"; the tokens the step
# trained on, over all processes). The index lets a step draw its own random numbers from a seed of its own.
StepFn = Callable[[int, list[list[int]]], tuple[dict[str, float], int]]
# (trainable parameters, max norm) -> the gradients' total norm before clipping
ClipFn = Callable[[list[torch.nn.Parameter], float], torch.Tensor | float]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    kind = "training"


class BatchTooLargeError(UserError, MemoryError):
    """A micro-batch does not fit in the device's memory; the message names the setting to change."""

    kind = "memory"


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """LambdaLR factor for step `step`: linear warm-up to the peak, then cosine decay to 10% of it at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n sequences in `epoch`: a permutation of range(n) that depends on (seed, epoch) alone,
    from its own generator, so resuming needs no saved data-loader state and the global RNG is untouched."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(num_sequences: int, batch_size: int, section: str) -> int:
    """Whole optimizer steps of `batch_size` sequences in one pass over the data (a partial last one is dropped);
    raises ConfigError naming `<section>.batch_size` when the data holds not even one."""
    if num_sequences < batch_size:
        raise ConfigError(f"the data holds {num_sequences} sequences, fewer than {section}.batch_size={batch_size}: "
                          f"lower {section}.batch_size or raise data.train_tokens")
    return num_sequences // batch_size


@dataclass
class LoopSettings:
    """The loop's part of a config section (distill, teacher_tune)."""

    section: str  # the config section: names settings in messages ("<section>.lr") and labels the bar
    steps: int  # optimizer steps in all
    batch_size: int  # sequences per optimizer step, over all processes
    micro_batch_size: int  # sequences per forward/backward pass
    seed: int  # the data order's
    grad_clip: float  # max total gradient norm
    checkpoint_every: int  # optimizer steps between checkpoints


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint ("tokens", "seconds", "last", "latest") and returned at the
    end."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all processes
    seconds: float = 0.0  # time inside steps only (no loading, no checkpoint saves)
    last: dict[str, float] = field(default_factory=dict)  # the last step's logged numbers
    # Each number's value at the last step that logged it: steps of different kinds log different numbers (an
    # on-policy step has no CE), and a run's summary wants each one's final value whatever the last step was.
    latest: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def counters(self) -> dict[str, float]:
        """steps, tokens, seconds, tokens_per_s: the start of every training summary."""
        return {"steps": self.step, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s}

    def final(self, keys: Iterable[str]) -> dict[str, float]:
        """The latest logged values of `keys` as final_<key> (those ever logged)."""
        return {f"final_{k}": v for k, v in self.latest.items() if k in set(keys)}


def _state_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer wraps the torch optimizer as `.optimizer`; checkpoints hold the torch
    # one's state (keyed by parameter name), so a checkpoint resumes with or without accelerate.
    return getattr(optimizer, "optimizer", optimizer)


def resume(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress | None:
    """Load the newest complete checkpoint in `ckpt_dir` into model, optimizer, scheduler and the RNG; its
    progress, or None when there is none (a fresh start)."""
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return None
    state = load_checkpoint(ckpts[-1], model, _state_optimizer(optimizer), scheduler)
    # Checkpoints written before "latest" existed: the last step's numbers are the best there is.
    return Progress(state["step"], state["tokens"], state["seconds"], state["last"],
                    dict(state.get("latest") or state["last"]))


def _grad_norm(norm: torch.Tensor | float) -> float:
    # Under FSDP2 the norm is a DTensor whose full value needs the other shards.
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def run_training(step_fn: StepFn, num_sequences: int, settings: LoopSettings, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, ckpt_dir: Path,
                 clip_grad: ClipFn, *, log_fn: LogFn | None = None, rank: int = 0, processes: int = 1,
                 on_fresh_start: Callable[[], None] | None = None,
                 extra_metrics: Callable[[int, float], dict[str, float]] | None = None,
                 agree: Callable[[bool], bool] | None = None, shown: tuple[str, ...] = ("loss",),
                 nonfinite_hint: str = "") -> Progress:
    """Train for settings.steps optimizer steps, resuming from the newest checkpoint in `ckpt_dir`.

    Each step takes settings.batch_size sequences of the epoch's order (`epoch_order` over `num_sequences`),
    gives this process (`rank` of `processes`) an equal contiguous slice, split into micro-batches of
    settings.micro_batch_size, to `step_fn`, then checks the loss, clips, steps optimizer and scheduler.
    `model` is what checkpoints hold (its trainable parameters are the ones clipped); `optimizer` is stepped
    and may be accelerate's wrapper. Hooks: `on_fresh_start` runs once when there is no checkpoint to resume;
    `extra_metrics(step_tokens, step_seconds)` adds numbers to each step's log; `agree(flag)` makes the
    processes agree on stopping for the time limit (a collective: True everywhere if True anywhere). Only rank
    0 logs and shows the bar, which displays the step's `shown` numbers.

    Raises NonFiniteLossError (nothing saved for that step) when "loss" is NaN or inf, naming
    `<section>.lr` (+ `nonfinite_hint`), and deadline.TimeLimitReached after saving a checkpoint when the next
    steps would not fit in the time limit. Returns the progress at the end.
    """
    s = settings
    per_epoch = steps_per_epoch(num_sequences, s.batch_size, s.section)
    per_rank = s.batch_size // processes
    accum = per_rank // s.micro_batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    progress = resume(ckpt_dir, model, optimizer, scheduler)
    if progress is None:
        progress = Progress()
        if on_fresh_start is not None:
            on_fresh_start()
    main = rank == 0
    bar = tqdm(range(progress.step, s.steps), desc=s.section, initial=progress.step, total=s.steps, unit="step",
               disable=not main)
    order_epoch, order = -1, []
    for step in bar:
        t0 = time.perf_counter()
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:  # one permutation per epoch, not per step
            order_epoch, order = epoch, epoch_order(num_sequences, s.seed, epoch)
        batch = order[pos * s.batch_size:(pos + 1) * s.batch_size]
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        numbers, step_tokens = step_fn(step, [mine[m * s.micro_batch_size:(m + 1) * s.micro_batch_size]
                                        for m in range(accum)])
        if not math.isfinite(numbers["loss"]):
            # Before the optimizer step: the weights in memory and on disk stay those of the last good step.
            _non_finite(numbers, step + 1, s.section, ckpt_dir, nonfinite_hint)
        grad_norm = _grad_norm(clip_grad(params, s.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        progress.step = step + 1
        progress.tokens += step_tokens
        progress.seconds += dt
        progress.last = {**numbers, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": step_tokens / dt, **(extra_metrics(step_tokens, dt) if extra_metrics else {})}
        progress.latest.update(progress.last)
        bar.set_postfix({k: f"{numbers[k]:.3f}" for k in shown if k in numbers})
        if log_fn and main:
            log_fn(progress.last, step + 1)
        interrupt.check()  # a Ctrl-C swallowed during the step (a finalizer, a library) stops here
        done = step + 1 == s.steps
        # remaining() first: without a time limit no collective is needed to agree on not stopping.
        stop = not done and deadline.remaining() is not None and (agree or bool)(
            deadline.training_should_stop(dt))
        if (step + 1) % s.checkpoint_every == 0 or done or stop:
            save_checkpoint(ckpt_dir, step + 1, model, _state_optimizer(optimizer), scheduler,
                            {"tokens": progress.tokens, "seconds": progress.seconds, "last": progress.last,
                             "latest": progress.latest})
        if stop:
            raise deadline.TimeLimitReached(f"{s.section} stopped at step {step + 1} of {s.steps} for the time "
                                            "limit; its checkpoint is saved and a rerun resumes from it")
    return progress


def _non_finite(numbers: dict[str, float], step: int, section: str, ckpt_dir: Path, hint: str) -> None:
    good = list_checkpoints(ckpt_dir)
    others = ", ".join(f"{k} {v}" for k, v in numbers.items() if k != "loss")
    where = f"{section}: loss is {numbers['loss']} at step {step}" + (f" ({others})" if others else "")
    if step == 1:
        # The first step's loss comes before any update, so the learning rate cannot be the cause: the model
        # or its data is.
        raise NonFiniteLossError(
            f"{where}, before any update: the model's output is already NaN or infinite. Its weights may hold "
            "NaN/inf (a diverged or damaged checkpoint) or it overflows in this dtype; check the model you gave.")
    raise NonFiniteLossError(
        f"{where}; last good checkpoint: {good[-1] if good else 'none'}, a rerun resumes from it. "
        f"Lower {section}.lr{hint}.")
