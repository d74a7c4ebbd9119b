"""Stages `latency_teacher` and `latency`: the teacher timed once (and on GPU on our fused kernels too), then each
student with the same settings.

The student's speedups are over the teacher at its best per setting: stock transformers or our fused kernels,
whichever was faster there (each row says which), as a user serving the teacher would choose. Teacher and student
are timed in separate stages, on the same device with the same settings, so that a run with several students
(`students:`) times the teacher once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.hashing import hash_files
from eval.latency import LatencySettings, best_of, compare_latency, measure_latency
from pipelines.context import RunContext
from teachers.fused import use_fused_kernels
from teachers.load import load_causal_lm, load_tokenizer


def latency_settings(ctx: RunContext) -> LatencySettings:
    s = LatencySettings.for_device(ctx.device)
    lc = ctx.cfg.latency
    if lc.repeats:
        s.repeats = lc.repeats
    if lc.static_compile != "auto":
        s.static_compile = lc.static_compile == "on"
    if lc.graph_decode != "auto":
        s.graph_decode = lc.graph_decode == "on"
    return s


def _fused_copy(model: torch.nn.Module) -> dict[str, Any]:
    """Switch a loaded teacher to our fused MoE kernels (GPU); {"experts_implementation": ...} either way."""
    return use_fused_kernels(model, torch.device("cuda"))


def host_probe_of(result: dict[str, Any]) -> float | None:
    """The host probe recorded with one model's measure_latency result (None if it has none)."""
    return next((e["host_probe_us"] for e in result.values() if isinstance(e, dict) and e.get("host_probe_us")),
                None)


def _timed(ctx: RunContext, roles: list[tuple[str, str]], reference_probe_us: float | None = None
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time the model of each (role, stage) in turn, with the device's settings; returns ({role: measure_latency
    result}, the fused-kernel summary when a role is "teacher_fused"). Each model waits for host conditions like
    those of `reference_probe_us` (default: the first model timed here)."""
    cfg = ctx.cfg
    trust = cfg.teacher_options.trust_remote_code
    settings = latency_settings(ctx)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and cfg.latency.cpu_threads:
        # Two threads on a shared 2-core box swing by 10x with the neighbours' load; one thread is steadier.
        torch.set_num_threads(cfg.latency.cpu_threads)
    fused: dict[str, Any] = {}
    results = {}
    try:
        for role, stage in roles:
            model = load_causal_lm(ctx.output(stage, "path"), role, ctx.device, ctx.dtype, trust)
            if role == "teacher_fused":
                fused = _fused_copy(model)
            results[role] = measure_latency(model, len(load_tokenizer(ctx.output(stage, "path"), role, trust)),
                                            settings, ctx.device, reference_probe_us)
            reference_probe_us = reference_probe_us or host_probe_of(results[role])
            del model
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(threads)
    return results, fused


def latency_teacher_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """The teacher timed once for every student of the run: on stock transformers and, on GPU, on our fused
    kernels too (what serving it would cost at its best). Compiling the static-cache decode costs about a minute
    per model and batch size: timing the teacher once, not per student, is most of a multi-student run's latency
    cost saved."""
    roles = [("teacher", "teacher_tune")]
    if ctx.device.type == "cuda" and ctx.cfg.latency.teacher_fused:
        roles.append(("teacher_fused", "teacher_tune"))
    results, fused = _timed(ctx, roles)
    # The fused teacher against the stock one: the "student" side of this comparison is the fused teacher.
    fused_table = compare_latency(results["teacher"], results["teacher_fused"]) if "teacher_fused" in results else {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"raw": results, "teacher_fused": fused_table, "fused": fused},
                                                 indent=1, default=str))
    metrics = {f"latency/{key}/fused_teacher_speedup": row["speedup"] for key, row in fused_table.items()
               if isinstance(row.get("speedup"), (int, float))}
    return {"outputs": {"raw": results, "teacher_fused": fused_table, "fused": fused},
            "output_hash": hash_files(out), "metrics": metrics}


def latency_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """The student timed with the same settings, against the teacher's times from `latency_teacher` at its best
    per setting."""
    cfg = ctx.cfg
    teacher = ctx.records["latency_teacher"]["outputs"]
    results, _ = _timed(ctx, [("student", "distill")], host_probe_of(teacher["raw"]["teacher"]))
    results = {**teacher["raw"], **results}
    # The student against the teacher at its best per setting (stock or our kernels, whichever was faster):
    # a speedup over a teacher nobody would serve that way would flatter the student.
    teachers = {"stock": results["teacher"]}
    if "teacher_fused" in results:
        teachers["fused"] = results["teacher_fused"]
    table = compare_latency(best_of(teachers), results["student"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"raw": results, "compare": table,
                                                  "teacher_fused": teacher["teacher_fused"],
                                                  "fused": teacher["fused"]}, indent=1, default=str))
    metrics = {}
    for key, row in table.items():
        for who in ("teacher", "student", "speedup"):
            if isinstance(row.get(who), (int, float)):
                metrics[f"latency/{key}/{who}"] = row[who]
    return {"outputs": {"compare": table, "teacher_fused": teacher["teacher_fused"], "fused": teacher["fused"],
                        "raw": results, "threads": cfg.latency.cpu_threads if ctx.device.type == "cpu" else None},
            "output_hash": hash_files(out), "metrics": metrics}
