"""Stage `distill`: train the student on the teacher's cached top-k distribution, or on the teacher itself.

distill.teacher_mode=online runs the teacher inside the training loop on the same sequences the cache was
built from (no cached logits used; needed for hidden-state alignment); distill.on_policy_rate > 0 runs it on the
student's own samples (distill/on_policy.py). Either way it runs on the fused MoE kernels on GPU. LoRA students (distill.lora_rank)
leave this stage merged, as plain dense models. `train_student_stage` is shared with the `baseline` stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core import distributed as dist
from core.hashing import hash_files
from distill.trainer import train_student
from logit_cache import LogitCache
from pipelines.context import RunContext
from pipelines.mlflow_datasets import log_training_data
from pipelines.tracking import log_metrics
from teachers.fused import use_fused_kernels
from teachers.load import load_causal_lm, load_teacher, load_tokenizer

if TYPE_CHECKING:
    from distill.config import DistillConfig


MODEL_PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def train_student_stage(ctx: RunContext, out: Path, dcfg: DistillConfig, step_prefix: str, summary_prefix: str,
           log_model: bool) -> dict[str, Any]:
    """Train the student stage's model with `dcfg`, save it under out/model; metrics per step as
    `<step_prefix>/<name>`, the summary as `<summary_prefix>/<name>`."""
    cfg = ctx.cfg
    trust = cfg.teacher_options.trust_remote_code
    # fp32 master weights everywhere; on GPU the trainer runs the forward under bf16 autocast.
    student = load_causal_lm(ctx.output("student", "path"), "student", ctx.device, torch.float32, trust)
    tok = load_tokenizer(ctx.output("student", "path"), "student", trust)
    cache = LogitCache(Path(ctx.output("logits", "cache")))
    if dist.is_main():
        log_training_data(Path(ctx.output("data", "sequences")), ctx.records["data"]["output_hash"])
    teacher = None
    if dcfg.needs_teacher():
        teacher, _ = load_teacher(ctx.output("teacher_tune", "path"), ctx.device, ctx.dtype,
                                  cfg.teacher_options.allow_dense, trust)
        use_fused_kernels(teacher, ctx.device)
    result = train_student(student, cache, dcfg, out / "checkpoints", cache.meta.vocab_size, ctx.device,
                           log_fn=lambda m, step: log_metrics({f"{step_prefix}/{k}": v for k, v in m.items()}, step),
                           teacher=teacher)
    del teacher
    if not dist.is_main():
        return {}  # the trained weights are rank 0's to save (identical under DDP, gathered to it under FSDP2)
    (out / "model").mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    outputs = {"path": str(out / "model"), **result}
    if log_model:
        import mlflow

        info = mlflow.transformers.log_model(transformers_model={"model": student.cpu(), "tokenizer": tok},
                                             name="student", task="text-generation",
                                             pip_requirements=MODEL_PIP_REQUIREMENTS)
        outputs["model_uri"] = info.model_uri
    return {"outputs": outputs, "output_hash": hash_files(out / "model"),
            "metrics": {f"{summary_prefix}/{k}": v for k, v in result.items()}}


def distill_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    return train_student_stage(ctx, out, ctx.cfg.distill, "train", "distill", log_model=True)
