"""Stages `eval_teacher`, `eval_student_init`, `eval_student`, `eval_baseline`, `eval_teacher_before`: lm-eval
scores of one model each.

One stage applied to five models: each scores the model of one upstream stage (the teacher is teacher_tune's
model, trained further or not) on the configured tasks and the held-out text. `eval_teacher_before` scores the
teacher stage's model, the teacher before its continued training, on the held-out text only: what teacher_tune
bought (for the built-in teacher, SmolLM2 upcycled with identical experts, which computes the dense model)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.hashing import hash_files
from eval import per_example
from eval.lm_eval_runner import flatten_metrics, run_lm_eval
from pipelines.context import RunContext
from pipelines.mlflow_eval_sets import log_eval_sets
from teachers.load import load_causal_lm, load_tokenizer

# The name an eval stage's metrics carry (eval/<role>/<task>...), as they did before teacher_tune existed.
ROLES = {"teacher_tune": "teacher"}


def evaluate(ctx: RunContext, out: Path, target: str, tasks: list[str] | None = None,
             role: str | None = None) -> dict[str, Any]:
    """lm-eval on the model of stage `target`; metrics as eval/<role>/<task>/<metric>. tasks: default the
    configured ones plus the held-out text (eval.heldout); role: default the stage's name (ROLES)."""
    cfg = ctx.cfg
    path = ctx.output(target, "path")
    trust = cfg.teacher_options.trust_remote_code
    role = role or ROLES.get(target, target)
    model = load_causal_lm(path, role, ctx.device, ctx.dtype, trust)
    tok = load_tokenizer(path, role, trust)
    if tasks is None:
        tasks = list(cfg.eval.tasks) + (["local_heldout_text"] if cfg.eval.heldout else [])
    heldout = ctx.output("data", "heldout")
    raw = run_lm_eval(model, tok, tasks, limit=cfg.eval.limit or None, batch_size=cfg.eval.batch_size,
                      metadata={"heldout_path": heldout})
    log_eval_sets(tasks, cfg.eval.limit, Path(heldout))
    flat = flatten_metrics(raw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_results.json").write_text(json.dumps(
        {k: raw.get(k) for k in ("results", "versions", "n-samples", "higher_is_better", "configs")},
        indent=1, default=str))
    (out / "metrics.json").write_text(json.dumps(flat, indent=1))
    # doc id -> score per task (no prompts): the report pairs these examples across models.
    per_example.write(out / "per_example", per_example.from_samples(raw.get("samples") or {}))
    metrics = {f"eval/{role}/{k}": v["value"] for k, v in flat.items() if v.get("value") is not None}
    return {"outputs": {"metrics": flat, "results_file": str(out / "lm_eval_results.json"),
                        "per_example": str(out / "per_example"),
                        "limit": cfg.eval.limit, "batch_size": cfg.eval.batch_size},
            "output_hash": hash_files(out), "metrics": metrics}


def eval_teacher(ctx: RunContext, out: Path) -> dict[str, Any]:
    return evaluate(ctx, out, "teacher_tune")


def eval_student_init(ctx: RunContext, out: Path) -> dict[str, Any]:
    return evaluate(ctx, out, "student")


def eval_student(ctx: RunContext, out: Path) -> dict[str, Any]:
    return evaluate(ctx, out, "distill")


def eval_baseline(ctx: RunContext, out: Path) -> dict[str, Any]:
    return evaluate(ctx, out, "baseline")


def eval_teacher_before(ctx: RunContext, out: Path) -> dict[str, Any]:
    return evaluate(ctx, out, "teacher", tasks=["local_heldout_text"], role="teacher_before")
