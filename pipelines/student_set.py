"""More than one student in one run (`students:` in the config): each extra student's own stages, and the section
of the report that compares them all.

The stages that read the student, directly or through another stage (student, distill, baseline, their
evaluations, latency, report), run once per extra student in runs/<run>/students/<name>/, each an MLflow run
under the run's parent tagged `student_variant=<name>`. The others (teacher, data, teacher_tune, logits,
eval_teacher) run once and are shared: every student learns from the same logit cache at the same budget, and
the teacher is trained and scored once. An extra student's finished stages are reused on a rerun like any stage,
and a time limit stops between or inside them as anywhere else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import UserError
from pipelines.config import student_variants
from pipelines.stage_cache import read_stage
from pipelines.stage_runner import active_stages, follow_stage, plan, run_stage

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.context import RunContext
    from pipelines.stage_table import Stage

MAIN = "main"  # the run's own student in the comparison


def per_student_stages(cfg: PipelineConfig) -> list[Stage]:
    """The active stages that depend on the student (the `student` stage and every stage downstream of it), in
    run order: what each extra student runs for itself."""
    needs = {"student"}
    out = []
    for stage in active_stages(cfg):
        if stage.name in needs or needs & set(stage.upstream):
            needs.add(stage.name)
            out.append(stage)
    return out


def student_dir(run_dir: Path, name: str) -> Path:
    """An extra student's folder: its stages sit here as the main student's sit in the run folder."""
    return run_dir / "students" / name


def _shared(records: dict[str, dict[str, Any]], per: list[Stage]) -> dict[str, dict[str, Any]]:
    own = {s.name for s in per}
    return {k: v for k, v in records.items() if k not in own}


def run_students(cfg: PipelineConfig, ctx: RunContext, tags: dict[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Rank 0: every extra student's stages after the main run's (`ctx` holds their records); returns {name: its
    stage records}."""
    from pipelines.context import RunContext

    per = per_student_stages(cfg)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, variant in student_variants(cfg):
        print(f"[students] {name}: {variant.student} {json.dumps(cfg.students[name], sort_keys=True)}", flush=True)
        vctx = RunContext(cfg=variant, run_dir=student_dir(ctx.run_dir, name), device=ctx.device)
        vctx.records = _shared(ctx.records, per)
        try:
            for stage in per:
                vctx.records[stage.name] = run_stage(stage, vctx, {**tags, "student_variant": name})
        except UserError as e:  # the same kind and exit code, saying which student's settings to fix
            e.args = (f"students.{name}: {e} (for this student, set it as students.{name}.<key>)",)
            raise
        out[name] = vctx.records
    return out


def follow_students(cfg: PipelineConfig, ctx: RunContext) -> None:
    """The other ranks of a multi-process launch: their share of each extra student's distributed stages."""
    from pipelines.context import RunContext

    per = per_student_stages(cfg)
    for name, variant in student_variants(cfg):
        vctx = RunContext(cfg=variant, run_dir=student_dir(ctx.run_dir, name), device=ctx.device)
        vctx.records = _shared(ctx.records, per)
        for stage in per:
            vctx.records[stage.name] = follow_stage(stage, vctx)


def plan_students(cfg: PipelineConfig, run_dir: Path, device: str,
                  main: dict[str, str]) -> dict[str, dict[str, str]]:
    """`--plan` for the extra students: {name: {stage: "reuse" | "run: <why>"}}, given the main run's plan
    `main` (a shared stage that reruns reruns every student's stages that read it)."""
    per = per_student_stages(cfg)
    own = {s.name for s in per}
    records = {name: read_stage(run_dir / name) or {"output_hash": "pending"} for name in main if name not in own}
    decided = {name: what for name, what in main.items() if name not in own}
    return {name: plan(variant, student_dir(run_dir, name), device, stages=per, known=(records, decided))
            for name, variant in student_variants(cfg)}


def students_report(main: dict[str, dict[str, Any]], extras: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The report's "students" section (eval.students.students_section) from the main run's stage records and each
    extra student's, read from their report stages' report.json."""
    from eval.students import student_row, students_section

    rows = []
    for name, records in {MAIN: main, **extras}.items():
        report = json.loads(Path(records["report"]["outputs"]["report_json"]).read_text())
        rows.append({**student_row(name, report), "folder": str(Path(records["report"]["outputs"]["report_json"])
                                                                .parent)})
    return students_section(rows)
