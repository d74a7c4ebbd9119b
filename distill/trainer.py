"""Train a dense student against a teacher (cached top-k or online), on accelerate, resumable exactly.

This file holds what is particular to the student: accelerate (device, bf16 autocast, backward), DDP or FSDP2
over several processes, LoRA, torch.compile, the loss module with its online teacher targets, the
out-of-memory guard and the MFU. The step loop itself (data order, checkpoints, exact resume, the NaN check,
the time limit) is the training-loop core shared with the teacher's training (core/training_loop.py); this
file gives it one step's micro-batch work.

The loss is fused with the output layer (distill/batch_loss.py). LoRA students train adapters through peft and
are merged at the end, so what leaves the trainer is always a plain dense model.

Launched on several processes (`accelerate launch`, GPUS=<n>), each process takes an equal slice of every
step's sequences and accelerate wraps the loss module in DDP or FSDP2; the logged losses are averaged over the
processes, so a step's numbers are those of one process given the whole step.
"""
from __future__ import annotations

import contextlib
import copy
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator

from core.checkpoint import list_checkpoints
from core.errors import ConfigError
from core.training_loop import (
    BatchTooLargeError,
    LogFn,
    LoopSettings,
    NonFiniteLossError,
    lr_lambda,
    run_training,
    steps_per_epoch,
)
from distill.batch_loss import (
    BatchTargets,
    LayerTerm,
    StudentParts,
    batch_loss,
    cached_targets,
    online_targets,
    student_parts,
)
from distill.config import DistillConfig
from distill.kd_losses import KDLossSpec
from distill.layer_transfer import layer_map, tap_layers
from distill.on_policy import OnPolicy, SamplingTwin, eos_ids, split_lengths
from distill.throughput import flops_per_token, peak_flops, peak_memory_gib

# Re-exported: callers catch them as `from distill.trainer import BatchTooLargeError, NonFiniteLossError`.
__all__ = ["BatchTooLargeError", "LogFn", "NonFiniteLossError", "total_steps", "train_student"]


def _is_out_of_memory(e: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator raises a plain RuntimeError (or MemoryError).
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


@contextmanager
def _memory_guard(cfg: DistillConfig, seq_len: int, device: torch.device, ckpt_dir: Path) -> Iterator[None]:
    """Turn an out-of-memory error of one micro-batch into a BatchTooLargeError naming the setting to change."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if _is_out_of_memory(e):
            raise _too_large(e, cfg, seq_len, device, ckpt_dir) from e
        raise


def _too_large(e: BaseException, cfg: DistillConfig, seq_len: int, device: torch.device,
               ckpt_dir: Path) -> BatchTooLargeError:
    good = list_checkpoints(ckpt_dir)
    smaller = max(1, cfg.micro_batch_size // 2)
    fix = (f'SET="distill.micro_batch_size={smaller}" (gradient accumulation keeps distill.batch_size='
           f'{cfg.batch_size})' if cfg.micro_batch_size > 1 else 'a shorter data.seq_len')
    if not cfg.gradient_checkpointing:
        fix += ' or SET="distill.gradient_checkpointing=true"'
    return BatchTooLargeError(
        f"out of memory on {device.type} with distill.micro_batch_size={cfg.micro_batch_size} x {seq_len + 1} "
        f"tokens: use {fix}. Last good checkpoint: {good[-1] if good else 'none'}; rerun resumes from it. "
        f"({type(e).__name__}: {str(e)[:200]})")


def _collate(items: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def total_steps(num_sequences: int, cfg: DistillConfig) -> int:
    """Optimizer steps of the run: distill.max_steps, or `epochs` passes over the data."""
    return cfg.max_steps or steps_per_epoch(num_sequences, cfg.batch_size, "distill") * cfg.epochs


def _wrap_lora(student: torch.nn.Module, cfg: DistillConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # all-linear: every Linear except the output layer, the usual choice for distillation into a student
    # that keeps the teacher's vocabulary head.
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules="all-linear")
    return get_peft_model(student, lora)


class _Trained(torch.nn.Module):
    """What a checkpoint holds: the student and, for hidden alignment, its projection."""

    def __init__(self, student: torch.nn.Module, projection: torch.nn.Module | None):
        super().__init__()
        self.student = student
        self.projection = projection


class _LossModule(torch.nn.Module):
    """The micro-batch loss as one module, so that DDP and FSDP2 see a forward that uses every parameter."""

    def __init__(self, trained: _Trained, parts: StudentParts, spec: KDLossSpec, vocab_size: int,
                 hidden_weight: float, layers: LayerTerm | None = None):
        super().__init__()
        self.trained = trained
        self.parts, self.spec, self.vocab_size, self.hidden_weight = parts, spec, vocab_size, hidden_weight
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, targets: BatchTargets,
                spec: KDLossSpec | None = None) -> dict[str, torch.Tensor]:
        return batch_loss(self.parts, input_ids, targets, spec or self.spec, self.vocab_size,
                          self.trained.projection, self.hidden_weight, self.layers)


def _shard(module: _LossModule, student: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each decoder layer (the classes the model names as not to be split) is its own unit,
    gathered just for its forward and backward; embeddings, final norm and head sit in the root unit.

    torch's `fully_shard` directly, not accelerate's FSDP plugin: the plugin is GPU-only, and this way the
    path that runs on GPUs is the one the 2-process CPU test checks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On GPU the gathered weights are bf16 (what autocast would cast them to anyway); gradients reduce in fp32.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())
    layers = set(getattr(student, "_no_split_modules", None) or [])
    for m in list(student.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mp_policy=mp)
    fully_shard(module, mp_policy=mp)


def train_student(student: torch.nn.Module, dataset: torch.utils.data.Dataset, cfg: DistillConfig,
                  ckpt_dir: Path, vocab_size: int, device: torch.device, log_fn: LogFn | None = None,
                  teacher: torch.nn.Module | None = None) -> dict[str, float]:
    """Distil into `student` in place; resumes from the newest checkpoint in `ckpt_dir` if there is one.

    dataset items: input_ids [S] and, with cfg.teacher_mode == "cache", topk_ids [S, k], topk_logprobs [S, k],
    tail_logmass [S]. Online mode needs `teacher` (same tokenizer), which is run under no_grad per batch.
    Returns a summary (steps, tokens, final loss/kd/ce, seconds, mean tokens/s and MFU). With several
    processes every rank trains; with FSDP2 only rank 0's `student` holds the trained weights at the end.
    """
    online = cfg.teacher_mode == "online"
    if cfg.needs_teacher() and teacher is None:
        raise ValueError("distill.teacher_mode=online and distill.on_policy_rate > 0 need the teacher model")
    torch.manual_seed(cfg.seed)
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    world = acc.num_processes
    cfg.validate(processes=world)
    fsdp = cfg.parallel == "fsdp" and world > 1
    plain = student
    if fsdp:
        # FSDP2 turns the modules it shards into other classes in place; the caller's student stays a plain
        # model (parked on the CPU) and receives the trained weights at the end.
        student = copy.deepcopy(student)
        plain.to("cpu")
    student.to(acc.device).train()
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and keeps RNG handling exact.
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        student = _wrap_lora(student, cfg)
    projection = None
    if cfg.hidden_weight > 0:
        hs, ht = student.config.hidden_size, teacher.config.hidden_size
        projection = (torch.nn.Identity() if hs == ht else torch.nn.Linear(hs, ht, bias=False)).to(acc.device)
    trained = _Trained(student, projection)
    if teacher is not None:
        teacher.to(acc.device).eval().requires_grad_(False)
    parts = student_parts(student, cfg.fused_loss)
    layers = teacher_tap = None
    if cfg.layer_weight > 0:
        # Hooks on every student layer and on the teacher layer each came from, for the whole training.
        teacher_tap = tap_layers(teacher, layer_map(student, teacher))
        layers = LayerTerm(tap_layers(student), cfg.layer_weight, cfg.layer_loss)
    # A compiled decoder would trace the layer hooks' Python list writes as graph breaks: left eager then.
    if layers is None and (cfg.compile == "on" or (cfg.compile == "auto" and acc.device.type == "cuda")):
        # Only the decoder: the fused loss syncs once per call (the token count), which would break a graph.
        # It fuses norms, RoPE and activations: 1.16x tokens/s on a 1B student on an H100 (bench/results/).
        parts.decoder = torch.compile(parts.decoder)
    module = _LossModule(trained, parts, cfg.loss_spec(), vocab_size, cfg.hidden_weight, layers)
    steps = total_steps(len(dataset), cfg)
    if fsdp:
        _shard(module, student, acc.device)  # before the optimizer: sharding replaces the parameters
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, steps))
    if world > 1 and not fsdp:
        module, opt = acc.prepare(module, opt)  # DDP
    else:
        opt = acc.prepare(opt)
    seq_len = len(dataset[0]["input_ids"]) - 1
    on_policy = _on_policy(cfg, seq_len + 1, student)
    on_spec = cfg.on_policy_spec() if on_policy else None
    # The decode path: static KV cache and a compiled one-token step on GPU (core/sampling.py), on a bf16 twin of
    # the student; under FSDP2 the sharded student itself samples, on the default cache.
    static_decode = on_policy is not None and acc.device.type == "cuda" and not fsdp
    twin = SamplingTwin(trained.student) if static_decode else None
    model_flops = flops_per_token(student.get_base_model() if cfg.lora_rank else student, seq_len)
    peak = peak_flops(acc.device)

    def step(index: int, micro_batches: list[list[int]]) -> tuple[dict[str, float], int]:
        """Forward and backward of this process's micro-batches; the step's means over all processes."""
        accum = len(micro_batches)
        sums: dict[str, float] = {}
        step_tokens = 0
        policy = on_policy is not None and on_policy.takes(index)
        for m, items in enumerate(micro_batches):
            mb = _collate([dataset[i] for i in items], acc.device)
            ids = mb["input_ids"]
            # Gradients are averaged over the processes once per step, at its last micro-batch.
            sync = (contextlib.nullcontext() if world == 1 or fsdp or m == accum - 1  # FSDP2 reduces every pass
                    else acc.no_sync(module))
            with _memory_guard(cfg, seq_len, acc.device, ckpt_dir), sync:
                with acc.autocast():
                    extra_vals: dict[str, float] = {}
                    rows = None
                    if policy:
                        t0 = time.perf_counter()
                        if twin is not None and m == 0:
                            twin.refresh()  # the weights of this step, once for its micro-batches
                        sampler = twin.model if twin is not None else trained.student
                        ids, rows = on_policy.sample(sampler, ids, vocab_size, index, acc.process_index, m,
                                                     static_decode)
                        extra_vals = {"sample_s": time.perf_counter() - t0,
                                      "sampled_tokens": rows.numel() / ids.shape[0]}
                    if teacher_tap is not None:
                        teacher_tap.clear()
                    targets = (online_targets(teacher, ids, vocab_size, cfg.online_top_k, cfg.hidden_weight > 0, rows)
                               if online or policy else cached_targets(mb))
                    if teacher_tap is not None:
                        targets.layers = teacher_tap.taken()
                    out = module(ids, targets, on_spec if policy else None)
                    if policy:
                        # CE on the student's own sample is not a quality signal; the step reports its KD only.
                        out.pop("ce", None)
                    if on_policy is not None:
                        extra_vals["on_policy"] = float(policy)
                # One host sync for all the logged values of this micro-batch, not one per value.
                vals = dict(zip(out, torch.stack([v.detach().float() for v in out.values()]).tolist()))
                vals.update(extra_vals)
                acc.backward(out["loss"] / accum)
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v / accum
            step_tokens += targets.labels.numel()
        if world > 1:  # the step's numbers over all processes: means of equal-sized slices
            keys = sorted(sums)
            mean = acc.reduce(torch.tensor([sums[k] for k in keys], device=acc.device), reduction="mean")
            sums = dict(zip(keys, mean.tolist()))
            step_tokens *= world
        return sums, step_tokens

    def extra(step_tokens: int, dt: float) -> dict[str, float]:
        mfu = {"mfu": step_tokens * model_flops / dt / (peak * world)} if peak else {}
        return {"memory_gib": peak_memory_gib(acc.device), **mfu}

    loop = LoopSettings("distill", steps, cfg.batch_size, cfg.micro_batch_size, cfg.seed, cfg.grad_clip,
                        cfg.checkpoint_every)
    done = run_training(step, len(dataset), loop, trained, opt, sched, ckpt_dir, acc.clip_grad_norm_,
                        log_fn=log_fn, rank=acc.process_index, processes=world, extra_metrics=extra,
                        agree=lambda flag: _agree(flag, acc), shown=("loss", "kd", "ce"),
                        nonfinite_hint=" or check the logit cache" if not online else "")
    for tap in (teacher_tap, layers.tap if layers else None):
        if tap is not None:
            tap.remove()
    if cfg.lora_rank:
        student.merge_and_unload()  # folds the adapters into the wrapped model's own weights, in place
    if fsdp:
        _gather_into(plain, student, acc)
    plain.eval()
    summary = {**done.counters(), "processes": world,
               "parallel": "fsdp2" if fsdp else "ddp" if world > 1 else "none",
               **done.final(("loss", "kd", "ce", "hidden", "layers"))}
    if peak:
        summary["mfu"] = done.tokens * model_flops / max(done.seconds, 1e-9) / (peak * world)
    return summary


def _on_policy(cfg: DistillConfig, seq_tokens: int, student: torch.nn.Module) -> OnPolicy | None:
    """The on-policy settings for training sequences of `seq_tokens` tokens, or None when off."""
    if cfg.on_policy_rate == 0:
        return None
    try:
        prompt, new = split_lengths(seq_tokens, cfg.on_policy_prompt, cfg.on_policy_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return OnPolicy(cfg.on_policy_rate, prompt, new, cfg.sample_temperature, cfg.seed, eos_ids(student.config))


def _agree(flag: bool, acc: Accelerator) -> bool:
    """Collective with several processes: True on every rank if it is True on any (they stop together)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)


def _gather_into(plain: torch.nn.Module, sharded: torch.nn.Module, acc: Accelerator) -> None:
    """Collective: the full weights of the FSDP2-sharded copy, loaded into the plain student on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if acc.is_main_process:
        plain.load_state_dict(full)
        plain.to(acc.device)
