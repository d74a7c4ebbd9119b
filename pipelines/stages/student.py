"""Stage `student`: derive the dense student from the teacher, initialise one from a config.json, or check the
user's dense model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.errors import ConfigError, UnsupportedModelError
from core.hashing import hash_files
from pipelines.context import RunContext
from pipelines.model_records import external_identity, model_summary
from students.dense_twin import check_derivable
from students.derive import derive_dense_student, parse_keep_layers
from students.from_config import random_student
from students.layer_importance import block_influence
from students.routing_stats import RoutingStats, routing_stats
from students.vocab import shared_vocab_size
from teachers.load import ModelLoadError, is_moe, load_config, load_teacher, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


def check_student_source(name_or_path: str, teacher_path: str, trust_remote_code: bool) -> str:
    """A user-given student must be dense and share the teacher's vocabulary; return its resolved path."""
    path = resolve_model_path(name_or_path, "student")
    scfg = load_config(path, "student", trust_remote_code)
    if is_moe(scfg):
        raise ModelLoadError(f"student '{name_or_path}' is a Mixture-of-Experts model ({type(scfg).__name__}); "
                             "the student must be dense. Use STUDENT=derived to build one from the teacher.")
    tcfg = load_config(teacher_path, "teacher", trust_remote_code)
    shared_vocab_size(load_tokenizer(teacher_path, "teacher", trust_remote_code),
                      load_tokenizer(path, "student", trust_remote_code),
                      getattr(tcfg, "vocab_size", 0), getattr(scfg, "vocab_size", 0))
    return path


def _routing_stats_for(teacher: Any, seqs: torch.Tensor, method: str) -> RoutingStats | None:
    """Routing mass per layer and expert on the calibration sequences [N, S]; None for a dense teacher, or for
    method=uniform on a teacher whose routing weights cannot be read exactly (the plain average then assumes
    weights summing to 1, and derive refuses what needs the measured numbers)."""
    if not is_moe(teacher.config):
        return None
    try:
        return routing_stats(teacher, seqs.split(4))
    except UnsupportedModelError as e:
        if method != "uniform":
            raise
        log.warning("routing weights unreadable (%s); the uniform merge assumes they sum to 1", e)
        return None


def student_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Derive the dense student from the teacher, initialise one from a config.json, or check and reference the
    user's dense model."""
    cfg = ctx.cfg
    teacher_path = ctx.output("teacher_tune", "path")
    trust = cfg.teacher_options.trust_remote_code
    if cfg.student == "derived":
        teacher, tok = load_teacher(teacher_path, device="cpu", dtype=ctx.dtype,
                                    allow_dense=cfg.teacher_options.allow_dense, trust_remote_code=trust)
        so = cfg.student_options
        check_derivable(teacher.config)  # a family no dense architecture fits: refused before calibration
        n_layers = teacher.config.num_hidden_layers
        try:  # the layer spec against this teacher, before calibration spends any time
            parse_keep_layers(so.keep_layers, n_layers, torch.zeros(n_layers))
        except ValueError as e:
            raise ConfigError(f"student_options.keep_layers does not fit this {n_layers}-layer teacher: {e}") from e
        # Calibration on the first training sequences, a few at a time: even the uniform average needs the
        # total routed weight and the shared-expert gate (they scale the merged FFN), and it takes seconds.
        seqs = load_file(ctx.output("data", "sequences"))["input_ids"][:so.calib_sequences].long()
        stats = _routing_stats_for(teacher, seqs, so.method)
        influence = block_influence(teacher, seqs.split(4)) if so.keep_layers.startswith("top_") else None
        try:
            student = derive_dense_student(teacher, keep_layers=so.keep_layers, method=so.method,
                                           ffn_width=so.ffn_width, stats=stats, influence=influence,
                                           svd_rank=so.svd_rank)
        except ValueError as e:  # an option this teacher cannot take (width, rank): the message names it
            raise ConfigError(f"student_options: {e}") from e
        del teacher
        (out / "model").mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out / "model", safe_serialization=True)
        tok.save_pretrained(out / "model")
        path, identity = str(out / "model"), hash_files(out / "model")
        width = f", ffn_width={so.ffn_width}" if so.ffn_width else ""
        width += f", svd_rank={so.svd_rank}" if so.svd_rank else ""
        name = f"derived({so.method}, layers={so.keep_layers}{width})"
    elif cfg.student.endswith(".json"):
        tok = load_tokenizer(teacher_path, "teacher", trust)
        student = random_student(Path(cfg.student), len(tok), cfg.student_options.seed)
        (out / "model").mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out / "model", safe_serialization=True)
        tok.save_pretrained(out / "model")  # the teacher's vocabulary, by construction
        path, identity = str(out / "model"), hash_files(out / "model")
        name = f"random({Path(cfg.student).name}, seed={cfg.student_options.seed})"
    else:
        path = check_student_source(cfg.student, teacher_path, trust)
        identity = external_identity(path)
        from teachers.load import load_causal_lm
        student = load_causal_lm(path, "student", "cpu", ctx.dtype, trust)
        name = cfg.student
    summary = model_summary(student, name, path)
    summary["init"] = ("derived" if cfg.student == "derived" else "random" if cfg.student.endswith(".json")
                       else "pretrained")
    return {"outputs": {"path": path, "summary": summary}, "output_hash": identity,
            "metrics": {"student/params_total": summary["params_total"]}}
