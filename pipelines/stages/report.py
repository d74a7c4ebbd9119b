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
from eval import bootstrap, per_example
from eval.chance import chance_level
from eval.headline_metrics import RULE, headline_metrics, headline_status
from eval.latency import HEADLINE_SETTINGS
from eval.report import NULL_REASONS, retained_gain, retained_value, write_report
from pipelines.context import RunContext
from pipelines.tracking import git_commit

EVAL_STAGES = (("eval_teacher", "teacher"), ("eval_student_init", "student_init"), ("eval_student", "student"),
               ("eval_baseline", "baseline"))


def _per_example(ctx: RunContext) -> dict[str, dict[str, tuple[list[int], bootstrap.Scores]]]:
    """{role: {"task/metric": (doc ids, Scores)}} from each eval stage's per_example folder (absent: {})."""
    out = {}
    for stage, role in EVAL_STAGES:
        folder = ((ctx.records.get(stage) or {}).get("outputs") or {}).get("per_example")
        out[role] = per_example.read(Path(folder)) if folder else {}
    return out


def paired_intervals(row: dict[str, Any], key: str, scores: dict[str, dict[str, tuple[list[int], Any]]]) -> None:
    """Add the paired bootstrap intervals of one quality row, where every model involved has per-example
    scores of `key`: "student_minus_baseline" and "teacher_minus_baseline" (eval.bootstrap.paired_difference,
    the task's name as its random stream). Rows without a baseline get none."""
    if "baseline" not in row:
        return
    have = {role: scores.get(role, {}).get(key) for role in ("teacher", "student", "baseline")}
    if any(v is None for v in have.values()):
        return
    p = per_example.paired(have)
    if not p["teacher"].n:
        return
    task = key.rpartition("/")[0]
    row["student_minus_baseline"] = bootstrap.paired_difference(p["student"], p["baseline"], stream=task)
    row["teacher_minus_baseline"] = bootstrap.paired_difference(p["teacher"], p["baseline"], stream=task)


def quality_rows(per: dict[str, dict[str, Any] | None],
                 scores: dict[str, dict[str, tuple[list[int], Any]]]) -> dict[str, Any]:
    """The report's quality rows from each role's flat metrics (eval.lm_eval_runner.flatten_metrics; the
    baseline None when it was not trained) and per-example scores ({role: {key: (doc ids, Scores)}}).

    Each headline metric's row gets "headline": {"counted": bool, "reason": "counted" | "not counted: ..."}
    (eval.headline_metrics.headline_status)."""
    per = {role: m for role, m in per.items() if m is not None}
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
        paired_intervals(row, key, scores)
        quality[key] = row
    for key in headline_metrics(quality):
        counted, reason = headline_status(quality[key])
        quality[key]["headline"] = {"counted": counted, "reason": reason}
    return quality


def headline_summary(quality: dict[str, Any],
                     scores: dict[str, dict[str, tuple[list[int], Any]]]) -> dict[str, Any]:
    """The summary's headline numbers over the counted headline metrics only: "retained_mean", with a
    baseline "retained_gain_mean" and its bootstrap interval "retained_gain_mean_ci"
    (eval.bootstrap.mean_gain_interval), and "headline" (which metrics count, how many, why the others not)."""
    heads = [k for k, r in quality.items() if "headline" in r]
    counted = [k for k in heads if quality[k]["headline"]["counted"]]
    kept = [quality[k]["retained"] for k in counted if math.isfinite(quality[k]["retained"])]
    out: dict[str, Any] = {
        "retained_mean": sum(kept) / len(kept) if kept else float("nan"),
        "headline": {"rule": RULE, "metrics": counted, "counted": len(counted), "tasks": len(heads),
                     "not_counted": {k: quality[k]["headline"]["reason"] for k in heads if k not in counted}}}
    if not any("baseline" in r for r in quality.values()):
        return out
    gains = [quality[k]["retained_gain"] for k in counted if math.isfinite(quality[k]["retained_gain"])]
    out["retained_gain_mean"] = sum(gains) / len(gains) if gains else float("nan")
    tasks = []
    for k in counted:
        have = {role: scores.get(role, {}).get(k) for role in ("teacher", "student", "baseline")}
        if any(v is None for v in have.values()):
            break
        p = per_example.paired(have)
        tasks.append((k.rpartition("/")[0], p["teacher"], p["student"], p["baseline"],
                      bool(quality[k]["higher_is_better"])))
    else:
        if tasks:
            out["retained_gain_mean_ci"] = bootstrap.mean_gain_interval(tasks)
    return out


def headline_speedup(latency: dict[str, Any]) -> tuple[float, str]:
    """Decode at batch 1, each model on its fastest decode path where two or more were timed (decode_best_b1),
    else on plain generate, as most users serve; else the first setting with a speedup."""
    for key in (*HEADLINE_SETTINGS, *latency.keys()):
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


def _tune_summary(ctx: RunContext, teacher_scores: dict[str, tuple[list[int], Any]]) -> dict[str, Any]:
    """The teacher's continued training for the report: steps, final losses, routing and spread before/after, and
    held-out text before/after (teacher_scores: eval_teacher's per-example scores, already read)."""
    out = ctx.records.get("teacher_tune", {}).get("outputs", {})
    if not out.get("tuned"):
        return {}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    side = {when: {"expert_spread": mean(out[when]["expert_spread"]),
                   **((out[when].get("routing") or {}).get("mean") or {})} for when in ("before", "after")}
    per_source = {when: (out[when].get("routing") or {}).get("specialisation_js_bits", {})
                  for when in ("before", "after")}
    return {"training": out["training"], "before": side["before"], "after": side["after"],
            "specialisation_by_source": per_source, "heldout": _tune_heldout(ctx, teacher_scores)}


HELDOUT_KEY = "heldout_text/bits_per_byte"


def _tune_heldout(ctx: RunContext, teacher_scores: dict[str, tuple[list[int], Any]]) -> dict[str, Any]:
    """Held-out bits per byte of the teacher before (eval_teacher_before) and after (eval_teacher) its continued
    training, and the paired bootstrap interval of after minus before over the same documents ({} without the
    before stage, or without the held-out text in either)."""
    recs = {role: (ctx.records.get(stage) or {}).get("outputs") or {}
            for stage, role in (("eval_teacher_before", "before"), ("eval_teacher", "after"))}
    values = {role: (r.get("metrics") or {}).get(HELDOUT_KEY, {}).get("value") for role, r in recs.items()}
    if any(v is None for v in values.values()):
        return {}
    out: dict[str, Any] = {"metric": HELDOUT_KEY, **values}
    origin = (((ctx.records.get("teacher") or {}).get("outputs") or {}).get("summary") or {}).get("upcycled_from")
    if origin:  # "before" is then the dense model itself: the comparison is teacher against its dense origin
        out["before_is_dense"] = origin
    before = recs["before"].get("per_example")
    have = {"before": per_example.read(Path(before)).get(HELDOUT_KEY) if before else None,
            "after": teacher_scores.get(HELDOUT_KEY)}
    if all(v is not None for v in have.values()):
        p = per_example.paired(have)
        if p["after"].n:
            out["after_minus_before"] = bootstrap.paired_difference(p["after"], p["before"], stream="heldout_text")
    return out


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


def _recipe_note(cfg: Any, logits: dict[str, Any]) -> str:
    """One line saying how the student was distilled: the loss, the teacher's form, the methods switched on."""
    d = cfg.distill
    parts = [f"{d.loss} KD at T={num(d.temperature)} (kd {num(d.kd_weight)}, ce {num(d.ce_weight)}) on the "
             + ("teacher run online" if d.teacher_mode == "online" else "teacher's top-k cache")]
    if d.on_policy_rate > 0:
        parts.append(f"on-policy on {d.on_policy_rate:.0%} of the steps ({d.on_policy_loss} on the student's own "
                     f"samples at temperature {num(d.sample_temperature)})")
    if d.layer_weight > 0:
        parts.append(f"layer-wise transfer ({d.layer_loss}, weight {num(d.layer_weight)})")
    if d.hidden_weight > 0:
        parts.append(f"last-hidden alignment (weight {num(d.hidden_weight)})")
    text = logits.get("teacher_text_sequences", 0)
    if text:
        parts.append(f"{text} of the {logits.get('corpus_sequences', 0) + text} training sequences written by the "
                     "teacher (sequence-level KD)")
    return "Recipe: " + "; ".join(parts) + "."


def report_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    scores = _per_example(ctx)
    # A switched-off evaluation (no baseline, eval.student_init=false) has a stand-in record without metrics.
    quality = quality_rows({role: ((ctx.records.get(stage) or {}).get("outputs") or {}).get("metrics")
                            for stage, role in EVAL_STAGES}, scores)
    headline = headline_summary(quality, scores)
    latency = ctx.output("latency", "compare") if "latency" in ctx.records else {}
    speedup, setting = headline_speedup(latency)
    logits = ctx.records["logits"]["outputs"]
    notes = list(ctx.output("teacher_tune", "notes"))
    notes.append(f"lm-eval scored {cfg.eval.limit or 'all'} examples per task (preset '{cfg.preset}'); "
                 "standard errors are shown where lm-eval reports them.")
    if not any(scores.values()):
        notes.append("No per-example scores were found in the evaluation stages' folders: no bootstrap intervals.")
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
    notes.append(_recipe_note(cfg, logits))
    curves, curve_notes = _training_curves(ctx)
    notes += curve_notes
    report = {
        "run": {"name": ctx.run_dir.name, "preset": cfg.preset, "git_commit": git_commit(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()})",
                "command": reproduce_command(cfg)},
        "teacher": ctx.output("teacher_tune", "summary"),
        "teacher_tune": _tune_summary(ctx, scores["teacher"]),
        "student": ctx.output("student", "summary"),
        "quality": quality,
        "latency": latency,
        "teacher_fused": ctx.output("latency", "teacher_fused") if "teacher_fused" in ctx.records.get(
            "latency", {}).get("outputs", {}) else {},
        "summary": {"retained_mean": headline.pop("retained_mean"), "speedup": speedup, "speedup_setting": setting,
                    **headline},
        "cache": {"path": logits["cache"], "tokens": logits["tokens"], "k": logits["k"], "bytes": logits["bytes"],
                  "bytes_per_token": logits["bytes_per_token"], "fidelity_kl": logits["fidelity_kl"],
                  "tokens_per_s": logits.get("tokens_per_s")},
        "router": logits.get("router") or {},
        # final_ce is absent when every step was on-policy (they log no CE): null in the report, not a failure
        "training": {k: ctx.records["distill"]["outputs"].get(k) for k in
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
