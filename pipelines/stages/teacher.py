"""Stage `teacher`: build the default upcycled teacher, or check that a user's teacher is a loadable MoE."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.hashing import hash_files
from pipelines.context import RunContext
from pipelines.model_records import external_identity, model_summary
from teachers.load import expert_count, load_teacher, resolve_model_path
from teachers.moe_config import experts_per_token
from teachers.smollm2_moe import DENSE_ORIGIN, UNTRAINED_NOTE, build_smollm2_moe

BUILTIN_TEACHERS = ("smollm2-moe",)


def teacher_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Build the default upcycled teacher, or check a user's teacher is a loadable MoE."""
    cfg = ctx.cfg
    opts = cfg.teacher_options
    notes: list[str] = []
    if cfg.teacher in BUILTIN_TEACHERS:
        path = build_smollm2_moe(out / "model", opts.num_experts, opts.top_k, opts.router_init_std)
        notes.append(UNTRAINED_NOTE)
        path_str, identity = str(path), hash_files(out / "model")
    else:
        path_str = resolve_model_path(cfg.teacher, "teacher")
        identity = external_identity(path_str)
    model, tok = load_teacher(path_str, device="cpu", dtype=ctx.dtype, allow_dense=opts.allow_dense,
                              trust_remote_code=opts.trust_remote_code)
    summary = model_summary(model, cfg.teacher, path_str)
    summary["num_experts"] = expert_count(model.config) or None
    summary["top_k"] = experts_per_token(model.config) or None
    if cfg.teacher in BUILTIN_TEACHERS:  # identical experts: as built, it computes this dense model exactly
        summary["upcycled_from"] = DENSE_ORIGIN
    return {"outputs": {"path": path_str, "summary": summary, "notes": notes, "vocab": len(tok)},
            "output_hash": identity,
            "metrics": {"teacher/params_total": summary["params_total"],
                        "teacher/params_active": summary["params_active"]}}
