"""Stages `teacher` and `student`: make or check the two models, and save them as transformers folders."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipelines.config import ConfigError
from pipelines.context import RunContext
from pipelines.stage_cache import hash_files
from students.derive import derive_dense_student, parse_keep_layers
from students.from_config import random_student
from students.layer_importance import block_influence
from students.routing_stats import routing_stats
from students.vocab import shared_vocab_size
from teachers.load import (ModelLoadError, count_parameters, is_moe, load_config, load_teacher, load_tokenizer,
                           resolve_model_path)
from teachers.smollm2_moe import UNTRAINED_NOTE, build_smollm2_moe

TUNED_NOTE = ("The teacher is SmolLM2-135M-Instruct sparse-upcycled to a Mixtral-class MoE and then trained further "
              "on the training text with a load-balancing loss (stage teacher_tune), so its experts differ: see "
              "the expert spread and the routing before and after in that stage's record.")

BUILTIN_TEACHERS = ("smollm2-moe",)


def external_identity(name_or_path: str) -> str:
    """Cheap identity of a model the pipeline did not write: file names, sizes and mtimes, or the hub id."""
    p = Path(name_or_path)
    if not p.is_dir():
        return hashlib.sha256(name_or_path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _model_summary(model: Any, name: str, path: str) -> dict[str, Any]:
    total, active = count_parameters(model)
    return {"name": name, "path": path, "params_total": total, "params_active": active,
            "architecture": type(model).__name__}


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
    summary = _model_summary(model, cfg.teacher, path_str)
    summary["num_experts"] = getattr(model.config, "num_local_experts", None) or getattr(
        model.config, "num_experts", None)
    summary["top_k"] = getattr(model.config, "num_experts_per_tok", None)
    return {"outputs": {"path": path_str, "summary": summary, "notes": notes, "vocab": len(tok)},
            "output_hash": identity,
            "metrics": {"teacher/params_total": summary["params_total"],
                        "teacher/params_active": summary["params_active"]}}


def teacher_tune_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Train the teacher further (teacher_tune.steps > 0), or pass the teacher stage's model on unchanged.

    Writes out/model (safetensors + tokenizer) and records the routing on the first `probe_sequences`
    training sequences before and after, and the spread between experts (teachers/continued_training.py)."""
    cfg = ctx.cfg
    tc = cfg.teacher_tune
    rec = ctx.records["teacher"]
    if tc.steps == 0:
        return {"outputs": {**rec["outputs"], "tuned": False}, "output_hash": rec["output_hash"], "metrics": {}}
    import json

    from pipelines.tracking import log_metrics
    from teachers.continued_training import expert_spread, measure_routing, tune_teacher

    opts = cfg.teacher_options
    # fp32 master weights: the optimizer's small steps would vanish in bf16 weights.
    teacher, tok = load_teacher(ctx.output("teacher", "path"), ctx.device, torch.float32, opts.allow_dense,
                                opts.trust_remote_code)
    if not is_moe(teacher.config):
        raise ConfigError("teacher_tune.steps > 0 needs an MoE teacher (it trains the routers with a "
                          "load-balancing loss); set teacher_tune.steps=0 for a dense one")
    seqs = load_file(ctx.output("data", "sequences"))["input_ids"]
    sources = list(cfg.data.sources)
    seq_sources = json.loads((Path(ctx.output("data", "sequences")).parent / "sequence_sources.json").read_text())
    probe = min(tc.probe_sequences, len(seqs))
    probe_ids = torch.tensor([sources.index(s) for s in seq_sources[:probe]])
    before_file = out / "routing_before.json"
    if before_file.exists():  # a resumed run: the teacher in memory is no longer the untrained one
        before = json.loads(before_file.read_text())
    else:
        before = {"routing": measure_routing(teacher, seqs[:probe], probe_ids, sources) if probe else None,
                  "expert_spread": expert_spread(teacher)}
        out.mkdir(parents=True, exist_ok=True)
        before_file.write_text(json.dumps(before))
    result = tune_teacher(teacher, seqs, tc, out / "checkpoints", ctx.device,
                          log_fn=lambda m, step: log_metrics({f"teacher_tune/{k}": v for k, v in m.items()}, step))
    after = {"routing": measure_routing(teacher, seqs[:probe], probe_ids, sources) if probe else None,
             "expert_spread": expert_spread(teacher)}
    (out / "model").mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    del teacher
    summary = {**rec["outputs"]["summary"], "path": str(out / "model"), "tuned_steps": tc.steps}
    notes = [TUNED_NOTE if n == UNTRAINED_NOTE else n for n in rec["outputs"]["notes"]]
    metrics = {f"teacher_tune/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    for when, m in (("before", before), ("after", after)):
        metrics[f"teacher_tune/expert_spread_{when}"] = sum(m["expert_spread"]) / max(1, len(m["expert_spread"]))
        if m["routing"]:
            for k, v in m["routing"]["mean"].items():
                metrics[f"teacher_tune/{k}_{when}"] = v
    return {"outputs": {"path": str(out / "model"), "summary": summary, "notes": notes, "vocab": len(tok),
                        "tuned": True, "training": result, "before": before, "after": after},
            "output_hash": hash_files(out / "model"), "metrics": metrics}


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
        n_layers = teacher.config.num_hidden_layers
        try:  # the layer spec against this teacher, before calibration spends any time
            parse_keep_layers(so.keep_layers, n_layers, torch.zeros(n_layers))
        except ValueError as e:
            raise ConfigError(f"student_options.keep_layers does not fit this {n_layers}-layer teacher: {e}") from e
        # Calibration on the first training sequences, a few at a time: even the uniform average needs the
        # total routed weight and the shared-expert gate (they scale the merged FFN), and it takes seconds.
        seqs = load_file(ctx.output("data", "sequences"))["input_ids"][:so.calib_sequences].long()
        stats = routing_stats(teacher, seqs.split(4)) if is_moe(teacher.config) else None
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
    summary = _model_summary(student, name, path)
    summary["init"] = ("derived" if cfg.student == "derived" else "random" if cfg.student.endswith(".json")
                       else "pretrained")
    return {"outputs": {"path": path, "summary": summary}, "output_hash": identity,
            "metrics": {"student/params_total": summary["params_total"]}}
