"""The pipeline's stages, in order: the function each runs, the config sections and upstream stages it reads.

A stage's code is not listed here: its identity is computed from the imports of the module that defines its
function (`pipelines.code_identity`), so it cannot drift from what actually runs. Config sections are listed
because a function reads them through `ctx.cfg` at run time, which no import shows; `RunContext` hands each
stage a view of the config that refuses any section the stage did not list, so the list cannot drift either.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from core.content_identity import file_checksums
from core.hashing import hash_text
from pipelines.model_records import external_identity
from pipelines.stages import (
    baseline,
    data,
    distill,
    eval_model,
    latency,
    logits,
    report,
    student,
    teacher,
    teacher_tune,
)
from resources.user_data import entry_files, resolve

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.context import RunContext

StageFn = Callable[["RunContext", Path], dict[str, Any]]


def _always(cfg: PipelineConfig) -> bool:
    return True


def _no_files(cfg: PipelineConfig) -> tuple[str, ...]:
    return ()


def _teacher_files(cfg: PipelineConfig) -> tuple[str, ...]:
    """The user's teacher by content, so replacing its weights in place reruns what depends on it."""
    return () if cfg.teacher in teacher.BUILTIN_TEACHERS else (external_identity(cfg.teacher),)


def _data_files(cfg: PipelineConfig) -> tuple[str, ...]:
    """The user's data (`data.files`) by content: each entry's files (names relative to it, sizes, checksums,
    cached by stat), so editing a data file reruns the data stage and what depends on it."""
    ids = []
    for entry in cfg.data.files:
        root, files = resolve(entry), entry_files(entry, cfg.data.format)
        names = [f.relative_to(root).as_posix() if root.is_dir() else f.name for f in files]
        ids.append(hash_text(*(f"{n}|{f.stat().st_size}|{c}" for n, f, c in zip(names, files, file_checksums(files)))))
    return tuple(ids)


def _student_files(cfg: PipelineConfig) -> tuple[str, ...]:
    return () if cfg.student == "derived" else (external_identity(cfg.student),)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    config: tuple[str, ...]  # config entries (sections or top-level keys) the output depends on
    upstream: tuple[str, ...]  # stages whose outputs it reads
    uses_device: bool = False  # its output depends on the device type (cpu / cuda)
    # Runs on every process of a multi-process launch (each its share of the data); others run on rank 0.
    distributed: bool = False
    enabled: Callable[[PipelineConfig], bool] = _always  # a switched-off stage is left out of the run
    # Content identities of what it reads from outside the repo and the run folder (a user's model folder):
    # config entries name such files, but only their content says whether the output is still valid.
    external: Callable[[PipelineConfig], tuple[str, ...]] = _no_files
    long: bool = False  # minutes or more on a real teacher: its MLflow run records system metrics

    @property
    def module(self) -> str:
        """The module whose import closure is this stage's code."""
        return self.fn.__module__


def _baseline_on(cfg: PipelineConfig) -> bool:
    return cfg.baseline.enabled


def _latency_on(cfg: PipelineConfig) -> bool:
    return cfg.latency.enabled


def _student_init_on(cfg: PipelineConfig) -> bool:
    return cfg.eval.student_init


def _teacher_before_on(cfg: PipelineConfig) -> bool:
    # Only where there is a before: a teacher trained further, and held-out text to compare on.
    return cfg.teacher_tune.steps > 0 and cfg.eval.heldout


STAGES: tuple[Stage, ...] = (
    Stage("teacher", teacher.teacher_stage, ("teacher", "teacher_options"), (), external=_teacher_files),
    Stage("data", data.data_stage, ("data", "teacher_options"), ("teacher",), external=_data_files),
    # From here on "the teacher" is this stage's model: the teacher stage's own when teacher_tune.steps=0.
    Stage("teacher_tune", teacher_tune.teacher_tune_stage, ("teacher_tune", "teacher_options", "data"),
          ("teacher", "data"), uses_device=True, long=True),
    Stage("logits", logits.logits_stage, ("logits", "teacher_options", "data"), ("teacher_tune", "data"),
          uses_device=True, distributed=True, long=True),
    Stage("student", student.student_stage, ("student", "student_options", "teacher_options"), ("teacher_tune", "data"),
          external=_student_files),
    Stage("distill", distill.distill_stage, ("distill", "teacher_options"), ("student", "logits"),
          uses_device=True, distributed=True, long=True),
    Stage("baseline", baseline.baseline_stage, ("distill", "baseline", "teacher_options"), ("student", "logits"),
          uses_device=True, distributed=True, enabled=_baseline_on, long=True),
    Stage("eval_teacher", eval_model.eval_teacher, ("eval", "teacher_options"), ("teacher_tune", "data"),
          uses_device=True, long=True),
    Stage("eval_teacher_before", eval_model.eval_teacher_before, ("eval", "teacher_options"), ("teacher", "data"),
          uses_device=True, enabled=_teacher_before_on),
    Stage("eval_student_init", eval_model.eval_student_init, ("eval", "teacher_options"), ("student", "data"),
          uses_device=True, enabled=_student_init_on),
    Stage("eval_student", eval_model.eval_student, ("eval", "teacher_options"), ("distill", "data"),
          uses_device=True),
    Stage("eval_baseline", eval_model.eval_baseline, ("eval", "teacher_options"), ("baseline", "data"),
          uses_device=True, enabled=_baseline_on),
    Stage("latency_teacher", latency.latency_teacher_stage, ("latency", "teacher_options"), ("teacher_tune",),
          uses_device=True, enabled=_latency_on),
    Stage("latency", latency.latency_stage, ("latency", "teacher_options"), ("latency_teacher", "distill"),
          uses_device=True, enabled=_latency_on),
    Stage("report", report.report_stage, ("teacher", "student", "preset", "run_name", "overrides", "eval", "latency",
                                          "baseline", "logits", "distill"),
          ("teacher", "teacher_tune", "logits", "student", "distill", "eval_teacher", "eval_teacher_before",
           "eval_student_init", "eval_student", "latency", "eval_baseline")),
)

BY_NAME = {s.name: s for s in STAGES}
