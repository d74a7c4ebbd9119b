"""Every check that can run before the first stage: minutes of setup, not hours of stages, find a bad input.

Each check reads configs, file headers and a bounded sample of weight bytes; none loads a model. A failure is
a `UserError` (one line, `error (<kind>): ...`, exit 3), raised before any stage output or MLflow run exists,
so nothing already written is touched. What the checks cover:
- the teacher: a loadable folder (or hub id), an MoE (unless allowed dense) whose layers, experts and routers
  are found by structure (`teachers.moe_layout`), complete safetensors files with finite weights;
- the logits settings against the teacher's vocabulary;
- the student: `derived` only from a family with a dense form (`students.dense_twin`), a dense folder with the
  same checks as the teacher, or a config.json that parses;
- the run folder and the MLflow artifact folder are writable.
The data section checks itself when the config loads (`resources.config.DataConfig.validate`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.errors import UserError
from pipelines.config import PipelineConfig, student_variants
from pipelines.stages.student import check_student_source
from pipelines.stages.teacher import BUILTIN_TEACHERS
from students.dense_twin import check_derivable
from students.from_config import student_config
from teachers.load import (
    check_teacher_config,
    config_size,
    is_moe,
    load_config,
    load_tokenizer,
    resolve_model_path,
    vocab_size,
)
from teachers.moe_layout import check_moe_layout
from teachers.smollm2_moe import VOCAB_SIZE as BUILTIN_VOCAB
from teachers.weight_files import check_weight_files


class PreflightError(UserError):
    """A setting that cannot work with the models or folders given; raised before any stage runs."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it; PreflightError if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise PreflightError("disk", f"cannot write to the {what} {folder} ({e.strerror or e}); make it writable "
                                     "(chmod u+w) or point the run elsewhere") from None


def _check_model_folder(name: str) -> None:
    """Complete safetensors files with finite weights, for a local folder (a hub id is checked when fetched)."""
    path = Path(name).expanduser()
    if path.is_dir():
        check_weight_files(path)


def preflight(cfg: PipelineConfig, run_dir: Path, artifact_dir: Path | None = None) -> list[str]:
    """Check the run's inputs and folders before any stage; returns notes worth printing (e.g. analytics that
    will be skipped). `artifact_dir`: the MLflow artifact folder when the store keeps artifacts locally."""
    check_writable(run_dir, "run folder")
    if artifact_dir is not None:
        check_writable(artifact_dir, "MLflow artifact folder")
    opts = cfg.teacher_options
    notes: list[str] = []
    teacher_path = teacher_cfg = None
    if cfg.teacher in BUILTIN_TEACHERS:
        vocab = tokens = BUILTIN_VOCAB
    else:
        teacher_path = resolve_model_path(cfg.teacher, "teacher")
        teacher_cfg = load_config(teacher_path, "teacher", opts.trust_remote_code)
        check_teacher_config(teacher_cfg, cfg.teacher, opts.allow_dense)
        if is_moe(teacher_cfg):  # a dense teacher (allow_dense) has no MoE layout to find
            notes += check_moe_layout(teacher_cfg, opts.trust_remote_code, opts.allow_dense)
        _check_model_folder(teacher_path)
        vocab = vocab_size(teacher_cfg)
        # The tokenizer must load, and fit the model: an id past the output layer fails deep inside a forward.
        tokens = len(load_tokenizer(teacher_path, "teacher", opts.trust_remote_code))
        if vocab and tokens > vocab:
            raise PreflightError("model", f"the teacher's tokenizer has {tokens} tokens but its model only {vocab} "
                                          "output rows; give the teacher folder the tokenizer it was trained with")
    context = config_size(teacher_cfg, "max_position_embeddings") if teacher_cfg is not None else 0
    if context and cfg.data.seq_len > context:
        raise PreflightError("config", f"data.seq_len={cfg.data.seq_len} is longer than the teacher's context "
                                       f"({context} positions, max_position_embeddings); set data.seq_len <= "
                                       f"{context}")
    if vocab and cfg.logits.top_k > vocab:
        raise PreflightError("config", f"logits.top_k={cfg.logits.top_k} is larger than the teacher's vocabulary "
                                       f"({vocab} tokens); set logits.top_k <= {vocab} (e.g. 64)")
    checked: set[str] = set()
    for name, student in [("", cfg.student)] + [(n, v.student) for n, v in student_variants(cfg)]:
        if student in checked:  # students that differ only in how they are built share one model check
            continue
        checked.add(student)
        try:
            notes += _check_student(student, teacher_cfg, teacher_path, tokens, opts.trust_remote_code)
        except UserError as e:
            if not name:
                raise
            e.args = (f"students.{name}: {e}",)  # the same kind and exit code, saying which student
            raise
    return notes


def _check_student(student: str, teacher_cfg: object, teacher_path: str | None, tokens: int,
                   trust_remote_code: bool) -> list[str]:
    """One student source against the teacher: derivable, a config.json that parses, or a dense folder with
    complete weights and the teacher's vocabulary. Returns notes."""
    if student == "derived":
        return [f"derived student: {check_derivable(teacher_cfg)}"] if teacher_cfg is not None else []
    if student.endswith(".json"):
        student_config(Path(student), tokens)
        return []
    path = resolve_model_path(student, "student")
    if teacher_path is not None:
        check_student_source(path, teacher_path, trust_remote_code)
    _check_model_folder(path)
    return []


def local_artifact_dir(uri: str | None) -> Path | None:
    """The folder behind an MLflow artifact location, when it is local (`file://` or a plain path)."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return Path(uri) if "://" not in uri and os.path.isabs(uri) else None
