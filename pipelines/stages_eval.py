"""Stages `eval_*` (lm-eval scores of one model), `latency` (teacher and student timed in one process)
and `report` (report.json/md/html and plots)."""
from __future__ import annotations

import json
import math
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from eval.latency import LatencySettings, compare_latency, measure_latency
from eval.lm_eval_runner import flatten_metrics, run_lm_eval
from eval.report import retained_gain, retained_value, write_report
from pipelines.context import RunContext
from pipelines.stage_cache import hash_files
from pipelines.tracking import git_commit
from teachers.load import load_causal_lm, load_tokenizer

# Which stage's model each eval stage scores (the teacher is teacher_tune's model, trained further or not).
EVAL_TARGETS = {"eval_teacher": "teacher_tune", "eval_student_init": "student", "eval_student": "distill",
                "eval_baseline": "baseline"}
# The name an eval stage's metrics carry (eval/<role>/<task>...), as they did before teacher_tune existed.
ROLES = {"teacher_tune": "teacher"}


def make_eval_stage(target: str) -> Callable[[RunContext, Path], dict[str, Any]]:
    def eval_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
        cfg = ctx.cfg
        path = ctx.output(target, "path")
        trust = cfg.teacher_options.trust_remote_code
        role = ROLES.get(target, target)
        model = load_causal_lm(path, role, ctx.device, ctx.dtype, trust)
        tok = load_tokenizer(path, role, trust)
        tasks = list(cfg.eval.tasks) + (["local_heldout_text"] if cfg.eval.heldout else [])
        raw = run_lm_eval(model, tok, tasks, limit=cfg.eval.limit or None, batch_size=cfg.eval.batch_size,
                          metadata={"heldout_path": ctx.output("data", "heldout")})
        flat = flatten_metrics(raw)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_eval_results.json").write_text(json.dumps(
            {k: raw.get(k) for k in ("results", "versions", "n-samples", "higher_is_better", "configs")},
            indent=1, default=str))
        (out / "metrics.json").write_text(json.dumps(flat, indent=1))
        metrics = {f"eval/{role}/{k}": v["value"] for k, v in flat.items() if v.get("value") is not None}
        return {"outputs": {"metrics": flat, "results_file": str(out / "lm_eval_results.json"),
                            "limit": cfg.eval.limit, "batch_size": cfg.eval.batch_size},
                "output_hash": hash_files(out), "metrics": metrics}
    return eval_stage


def latency_settings(ctx: RunContext) -> LatencySettings:
    s = LatencySettings.for_device(ctx.device)
    lc = ctx.cfg.latency
    if lc.repeats:
        s.repeats = lc.repeats
    if lc.static_compile != "auto":
        s.static_compile = lc.static_compile == "on"
    return s


def _fused_copy(model: torch.nn.Module) -> dict[str, Any]:
    """Switch a loaded teacher to our fused MoE kernels (GPU); {"experts_implementation": ...} either way."""
    from kernels.hf_moe import enable_fused_moe

    try:
        return enable_fused_moe(model)
    except ValueError as e:  # an unsupported model keeps transformers' own path; say why
        return {"experts_implementation": "stock", "reason": str(e)}


def latency_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    trust = cfg.teacher_options.trust_remote_code
    settings = latency_settings(ctx)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and cfg.latency.cpu_threads:
        # Two threads on a shared 2-core box swing by 10x with the neighbours' load; one thread is steadier.
        torch.set_num_threads(cfg.latency.cpu_threads)
    # On GPU the teacher is also timed on our fused kernels: what serving it would cost at its best.
    roles = [("teacher", "teacher_tune"), ("student", "distill")]
    if ctx.device.type == "cuda" and cfg.latency.teacher_fused:
        roles.insert(1, ("teacher_fused", "teacher_tune"))
    fused: dict[str, Any] = {}
    try:
        results = {}
        for role, stage in roles:
            model = load_causal_lm(ctx.output(stage, "path"), role, ctx.device, ctx.dtype, trust)
            if role == "teacher_fused":
                fused = _fused_copy(model)
            results[role] = measure_latency(model, len(load_tokenizer(ctx.output(stage, "path"), role, trust)),
                                            settings, ctx.device)
            del model
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(threads)
    table = compare_latency(results["teacher"], results["student"])
    # The fused teacher against the stock one: the "student" side of the comparison is the fused teacher.
    fused_table = compare_latency(results["teacher"], results["teacher_fused"]) if "teacher_fused" in results else {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"raw": results, "compare": table, "teacher_fused": fused_table,
                                                  "fused": fused}, indent=1, default=str))
    metrics = {}
    for key, row in table.items():
        for who in ("teacher", "student", "speedup"):
            if isinstance(row.get(who), (int, float)):
                metrics[f"latency/{key}/{who}"] = row[who]
    for key, row in fused_table.items():
        if isinstance(row.get("speedup"), (int, float)):
            metrics[f"latency/{key}/fused_teacher_speedup"] = row["speedup"]
    return {"outputs": {"compare": table, "teacher_fused": fused_table, "fused": fused, "raw": results,
                        "threads": cfg.latency.cpu_threads if ctx.device.type == "cpu" else None},
            "output_hash": hash_files(out), "metrics": metrics}


def _quality(ctx: RunContext) -> dict[str, Any]:
    per = {role: ctx.output(stage, "metrics") for stage, role in
           (("eval_teacher", "teacher"), ("eval_student_init", "student_init"), ("eval_student", "student"),
            ("eval_baseline", "baseline"))}
    if per["baseline"] is None:  # baseline.enabled is off
        del per["baseline"]
    quality = {}
    for key, t in per["teacher"].items():
        if key not in per["student"] or t.get("value") is None:
            continue
        hib = bool(t.get("higher_is_better", True))
        row = {role: per[role].get(key, {}).get("value") for role in per}
        row["higher_is_better"] = hib
        row["retained"] = retained_value(row["teacher"], row["student"], hib)
        if "baseline" in per:
            row["retained_gain"] = retained_gain(row["teacher"], row["student"], row["baseline"], hib)
        row["stderr"] = {role: per[role].get(key, {}).get("stderr") for role in per}
        quality[key] = row
    return quality


def _gain_summary(quality: dict[str, Any]) -> dict[str, float]:
    """Mean retained gain over the metrics where it is defined (only with a baseline)."""
    gains = [r["retained_gain"] for r in quality.values() if isinstance(r.get("retained_gain"), float)
             and math.isfinite(r["retained_gain"])]
    if not any("retained_gain" in r for r in quality.values()):
        return {}
    return {"retained_gain_mean": sum(gains) / len(gains) if gains else float("nan")}


def headline_speedup(latency: dict[str, Any]) -> tuple[float, str]:
    """Decode at batch 1 on plain generate is how most users serve; fall back to the first setting."""
    for key in ("decode_b1", *latency.keys()):
        row = latency.get(key)
        if row and isinstance(row.get("speedup"), (int, float)):
            return float(row["speedup"]), key
    return float("nan"), ""


def reproduce_command(cfg: Any) -> str:
    """The `make distill` line that repeats this run, its SET overrides included."""
    parts = [f"make distill TEACHER={cfg.teacher} STUDENT={cfg.student} PRESET={cfg.preset}"]
    if cfg.overrides.strip():
        parts.append(f"SET={shlex.quote(cfg.overrides.strip())}")
    if cfg.run_name:
        parts.append(f"RUN={cfg.run_name}")
    return " ".join(parts)


def _tune_summary(ctx: RunContext) -> dict[str, Any]:
    """The teacher's continued training for the report: steps, final losses, routing and spread before/after."""
    out = ctx.records.get("teacher_tune", {}).get("outputs", {})
    if not out.get("tuned"):
        return {}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    side = {when: {"expert_spread": mean(out[when]["expert_spread"]),
                   **((out[when].get("routing") or {}).get("mean") or {})} for when in ("before", "after")}
    per_source = {when: (out[when].get("routing") or {}).get("specialisation_js_bits", {})
                  for when in ("before", "after")}
    return {"training": out["training"], "before": side["before"], "after": side["after"],
            "specialisation_by_source": per_source}


def report_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    quality = _quality(ctx)
    finite = [r["retained"] for r in quality.values() if isinstance(r["retained"], float)
              and math.isfinite(r["retained"])]
    latency = ctx.output("latency", "compare") if "latency" in ctx.records else {}
    speedup, setting = headline_speedup(latency)
    logits = ctx.records["logits"]["outputs"]
    notes = list(ctx.output("teacher_tune", "notes"))
    notes.append(f"lm-eval scored {cfg.eval.limit or 'all'} examples per task (preset '{cfg.preset}'); "
                 "standard errors are shown where lm-eval reports them.")
    if not cfg.latency.enabled:
        notes.append("Latency was not measured (latency.enabled=false): no speedup figures.")
    elif ctx.device.type == "cpu":
        notes.append(f"Latency was measured on CPU with {ctx.output('latency', 'threads')} thread(s), fp32, "
                     "plain `generate` path.")
    notes.append(f"Teacher top-{logits['k']} cache: {logits['bytes_per_token']:.0f} bytes/token; mean "
                 f"KL(teacher || cache reconstruction) = {logits['fidelity_kl']:.4f} nats on a sample sequence.")
    fused = logits.get("fused") or {}
    if ctx.device.type == "cuda":
        notes.append(f"Teacher logits generated at {logits.get('tokens_per_s', 0):.0f} tokens/s with experts "
                     f"implementation `{fused.get('experts_implementation', 'stock')}`"
                     + (f" ({fused['reason']})" if fused.get("reason") else "") + ".")
    report = {
        "run": {"name": ctx.run_dir.name, "preset": cfg.preset, "git_commit": git_commit(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()})",
                "command": reproduce_command(cfg)},
        "teacher": ctx.output("teacher_tune", "summary"),
        "teacher_tune": _tune_summary(ctx),
        "student": ctx.output("student", "summary"),
        "quality": quality,
        "latency": latency,
        "teacher_fused": ctx.output("latency", "teacher_fused") if "teacher_fused" in ctx.records.get(
            "latency", {}).get("outputs", {}) else {},
        "summary": {"retained_mean": sum(finite) / len(finite) if finite else float("nan"),
                    "speedup": speedup, "speedup_setting": setting, **_gain_summary(quality)},
        "cache": {"path": logits["cache"], "tokens": logits["tokens"], "k": logits["k"], "bytes": logits["bytes"],
                  "bytes_per_token": logits["bytes_per_token"], "fidelity_kl": logits["fidelity_kl"],
                  "tokens_per_s": logits.get("tokens_per_s")},
        "router": logits.get("router") or {},
        "training": {k: ctx.output("distill", k) for k in
                     ("steps", "tokens", "final_loss", "final_kd", "final_ce", "seconds")},
        "mlflow": ctx.records.get("_mlflow", {}),
        "notes": notes,
        "python": sys.version.split()[0],
        "argv": shlex.join(sys.argv),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    paths = write_report(report, out)
    return {"outputs": {"report_json": str(out / "report.json"), "files": {k: str(v) for k, v in paths.items()},
                        "summary": report["summary"]},
            "output_hash": hash_files(out),
            "metrics": {"summary/retained_mean": report["summary"]["retained_mean"],
                        "summary/speedup": speedup}}
