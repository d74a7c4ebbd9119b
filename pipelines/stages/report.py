"""Stage `report`: report.json/md/html and plots from the records of every stage before it."""
from __future__ import annotations

import math
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from core.hashing import hash_files
from core.number_format import num, si_bytes
from core.strict_json import dumps_strict
from eval.chance import chance_level
from eval.report import NULL_REASONS, retained_gain, retained_value, write_report
from pipelines.context import RunContext
from pipelines.tracking import git_commit


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
        chance = chance_level(key)
        if chance is not None:  # accuracies of multiple-choice tasks only; absent elsewhere
            row["chance"] = chance
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


# Per-step series the training stages log to MLflow (pipelines/stages/distill.py): stage -> (metric prefix, series).
CURVE_SERIES = {"distill": ("train", ("loss", "kd", "ce", "hidden")), "baseline": ("baseline_train", ("loss",))}
MAX_CURVE_POINTS = 1000  # per series: enough for a plot, and report.json stays small on long runs


def _thin(points: list[list[float]], limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    """At most `limit` of `points`, evenly spaced, the last one always kept."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _training_curves(ctx: RunContext) -> tuple[dict[str, dict[str, list[list[float]]]], list[str]]:
    """The per-step losses the distill and baseline stages logged to MLflow, read back from the MLflow run each
    stage's record names: ({stage: {series: [[step, value], ...]}}, notes on what could not be read).

    A stage resumed after a kill logs its remaining steps in a new MLflow run, so its curve starts at the step
    it resumed from; the note says so."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    curves: dict[str, dict[str, list[list[float]]]] = {}
    notes: list[str] = []
    for stage, (prefix, names) in CURVE_SERIES.items():
        run_id = (ctx.records.get(stage) or {}).get("mlflow_run_id")
        if not run_id:
            continue
        series = {}
        try:
            for name in names:
                history = client.get_metric_history(run_id, f"{prefix}/{name}")
                if history:
                    series[name] = _thin([[m.step, m.value] for m in sorted(history, key=lambda m: m.step)])
        except MlflowException as e:
            notes.append(f"Training curves of `{stage}`: its MLflow run {run_id} could not be read from this "
                         f"tracking store ({type(e).__name__}); the curves are left out.")
            continue
        if not series:
            notes.append(f"Training curves of `{stage}`: its MLflow run {run_id} holds no per-step losses in this "
                         "tracking store (was the run logged to another store?); the curves are left out.")
        else:
            curves[stage] = series
            first = min(points[0][0] for points in series.values())
            if first > 1:
                notes.append(f"Training curves of `{stage}` start at step {first}: the stage resumed there after an "
                             "interruption, and the earlier steps were logged by the interrupted MLflow run.")
    return curves, notes


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
    notes.append(f"Teacher top-{logits['k']} cache: {si_bytes(logits['bytes_per_token'])} per token; mean "
                 f"KL(teacher || cache reconstruction) = {num(logits['fidelity_kl'])} nats on a sample sequence.")
    fused = logits.get("fused") or {}
    if ctx.device.type == "cuda":
        notes.append(f"Teacher logits generated at {num(logits.get('tokens_per_s'))} tokens/s with experts "
                     f"implementation `{fused.get('experts_implementation', 'stock')}`"
                     + (f" ({fused['reason']})" if fused.get("reason") else "") + ".")
    curves, curve_notes = _training_curves(ctx)
    notes += curve_notes
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
        "curves": curves,
        "mlflow": ctx.records.get("_mlflow", {}),
        "notes": notes,
        "python": sys.version.split()[0],
        "argv": shlex.join(sys.argv),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(dumps_strict(report, NULL_REASONS))
    paths = write_report(report, out)
    return {"outputs": {"report_json": str(out / "report.json"), "files": {k: str(v) for k, v in paths.items()},
                        "summary": report["summary"]},
            "output_hash": hash_files(out),
            "metrics": {"summary/retained_mean": report["summary"]["retained_mean"],
                        "summary/speedup": speedup}}
