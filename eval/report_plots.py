"""The report's plots, drawn from the report dict: quality against speedup (one point per model), quality per
task (bars with standard errors and chance levels) and the training curves.

Every number on a plot is written by core.number_format, as in the report's tables. Each function returns
False, drawing nothing, when the report lacks what its plot needs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the pipeline runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from core.number_format import is_proportion, num, pct, ratio, score, si_params  # noqa: E402
from eval.headline_metrics import headline_metrics  # noqa: E402
from eval.retained import retained_stderr, retained_value  # noqa: E402

# The models of a report, in drawing order: key in a quality row, label, colour, marker.
ROLES = (("teacher", "teacher", "#4c72b0", "o"), ("student_init", "student before distillation", "#999999", "s"),
         ("baseline", "baseline (CE only)", "#55a868", "^"), ("student", "distilled student", "#dd8452", "D"))
DPI = 110

PCT_AXIS = FuncFormatter(lambda v, _: pct(v))
RATIO_AXIS = FuncFormatter(lambda v, _: ratio(v))
NUM_AXIS = FuncFormatter(lambda v, _: num(v))


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _save(fig: Any, path: Path) -> bool:
    """Lay out, write and close a finished figure; True, what a plot function returns when it drew."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _roles(quality: dict) -> list[tuple[str, str, str, str]]:
    """The roles present in at least one quality row (the baseline only with baseline.enabled)."""
    return [r for r in ROLES if any(_finite(q.get(r[0])) is not None for q in quality.values())]


def model_points(report: dict) -> list[dict[str, Any]]:
    """One point per model for the quality-vs-speedup plot.

    Each: {"role", "label", "speedup" (teacher 1.0, the students the headline setting's speedup), "retained"
    (mean over the headline metrics of score / teacher's score, inverted where lower is better), "stderr"
    (standard error of that mean from the per-task standard errors, the teacher's scores as the fixed
    reference; NaN where no task has one), "metrics" (the headline metrics averaged)}. Empty without a speedup.
    Where the rows carry headline marks (pipelines/stages/report.py) and some count, only those are averaged,
    as in the summary's retained mean; where none counts, every headline metric (the title says so).
    """
    quality = report.get("quality") or {}
    speedup = _finite((report.get("summary") or {}).get("speedup"))
    if not quality or speedup is None:
        return []
    keys = headline_metrics(quality)
    counted = [k for k in keys if (quality[k].get("headline") or {}).get("counted")]
    keys = counted or keys
    points = []
    for role, label, _, _ in _roles(quality):
        kept, errs, used = [], [], []
        for key in keys:
            q = quality[key]
            hib = bool(q.get("higher_is_better", True))
            t, v = _finite(q.get("teacher")), _finite(q.get(role))
            r = retained_value(t, v, hib) if t is not None and v is not None else math.nan
            if not math.isfinite(r):
                continue
            kept.append(r)
            used.append(key)
            e = retained_stderr(t, v, (q.get("stderr") or {}).get(role), hib)
            if math.isfinite(e):
                errs.append(e)
        if not kept:
            continue
        points.append({"role": role, "label": label, "speedup": 1.0 if role == "teacher" else speedup,
                       "retained": sum(kept) / len(kept), "metrics": used,
                       "stderr": math.sqrt(sum(e * e for e in errs)) / len(kept) if errs else math.nan})
    return points


def plot_quality_vs_speedup(report: dict, path: Path) -> bool:
    """x: speedup over the teacher at the headline setting; y: mean retained quality over the headline metrics,
    ± one standard error; one point per model. The distilled student's horizontal bar spans its speedups over
    every timed setting."""
    points = model_points(report)
    if not points:
        return False
    summary = report.get("summary") or {}
    style = {r: (c, m) for r, _, c, m in ROLES}
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    speeds = [_finite(e.get("speedup")) for e in (report.get("latency") or {}).values() if e.get("metric") != "bytes"]
    speeds = [s for s in speeds if s is not None]
    student = next((p for p in points if p["role"] == "student"), None)
    if student and len(speeds) > 1:
        ax.hlines(student["retained"], min(speeds), max(speeds), color=style["student"][0], lw=6, alpha=0.18,
                  label=f"distilled student over every timed setting ({ratio(min(speeds))} to {ratio(max(speeds))})")
    for p in points:
        colour, marker = style[p["role"]]
        err = p["stderr"] if math.isfinite(p["stderr"]) else None
        text = f"{p['label']}: {pct(p['retained'])}" + (f" ± {pct(err)}" if err is not None else "")
        ax.errorbar([p["speedup"]], [p["retained"]], yerr=None if err is None else [err], fmt=marker, ms=9,
                    color=colour, mfc=colour if p["role"] in ("teacher", "student") else "white", mew=2, capsize=4,
                    label=f"{text} at {ratio(p['speedup'])}", zorder=3)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.9), max(hi, 1.1))
    ax.xaxis.set_major_formatter(RATIO_AXIS)
    ax.yaxis.set_major_formatter(PCT_AXIS)
    ax.set_xlabel(f"speedup over the teacher at {summary.get('speedup_setting') or 'the headline setting'}")
    ax.set_ylabel("retained quality (mean of score / teacher's)")
    n = len(points[0]["metrics"])
    marked = any("headline" in q for q in (report.get("quality") or {}).values())
    counted = any((q.get("headline") or {}).get("counted") for q in (report.get("quality") or {}).values())
    which = "counted headline" if counted else ("headline (none counts)" if marked else "headline")
    ax.set_title(f"Quality kept vs speed gained (mean over {n} {which} metric{'s' * (n != 1)}, ± 1 s.e.)",
                 fontsize=10)
    # Below the axes: the points of the students share one x and would hide under a legend inside.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_quality_per_task(report: dict, path: Path) -> bool:
    """One panel per task metric (accuracies and perplexities differ in scale): a bar per model with its
    standard error, its value above it, and the task's chance level as a dashed line where it has one."""
    quality = report.get("quality") or {}
    if not quality:
        return False
    names = sorted(quality)
    roles = _roles(quality)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        q = quality[name]
        err = q.get("stderr") or {}
        vals = [_finite(q.get(r)) for r, *_ in roles]
        # NaN draws no error bar at all, where 0 would draw a misleading flat cap.
        errs = [_finite(err.get(r)) if _finite(err.get(r)) is not None else math.nan for r, *_ in roles]
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(range(len(roles)), heights, yerr=errs, color=[c for _, _, c, _ in roles], capsize=3,
                      error_kw={"lw": 1})
        tops = [h + (e if math.isfinite(e) else 0.0) for h, e in zip(heights, errs)]
        for bar, v, top in zip(bars, vals, tops):  # above the error bar's cap, where nothing covers it
            ax.annotate(score(v, name), (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
        chance = _finite(q.get("chance"))
        if chance is not None:
            ax.axhline(chance, color="#c44e52", lw=1.2, ls="--", zorder=0.5)
            ax.annotate(f"chance {pct(chance)}", (1.0, chance), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=7, color="#c44e52", xytext=(-2, 1), textcoords="offset points")
        positive = [v for v in heights if v > 0]
        if positive and not is_proportion(name) and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # an untrained init's perplexity would flatten the bars that matter
        elif is_proportion(name):
            top = max(tops + [chance or 0.0])
            ax.set_ylim(0, min(1.0, top * 1.25) if top > 0 else 1.0)
            ax.yaxis.set_major_formatter(PCT_AXIS)
        else:
            ax.set_ylim(0, max(tops) * 1.15 if max(tops) > 0 else 1.0)
            ax.yaxis.set_major_formatter(NUM_AXIS)
        ax.set_xticks(range(len(roles)), [label.replace(" (CE only)", "\n(CE only)").replace(" before", "\nbefore")
                                          for _, label, _, _ in roles], fontsize=7)
        arrow = "higher is better" if q.get("higher_is_better", True) else "lower is better"
        mark = q.get("headline") or {}
        ax.set_title(f"{name} ({arrow})" + ("\nnot counted in the headline" if mark and not mark.get("counted")
                                            else ""), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _save(fig, path)


# Training curves: stage in report["curves"], series name -> label, colour, line style.
CURVES = (("distill", "loss", "distill: total loss", "#dd8452", "-"),
          ("distill", "kd", "distill: KD (KL to the teacher)", "#c44e52", "-"),
          ("distill", "ce", "distill: CE (next token)", "#4c72b0", "-"),
          ("distill", "hidden", "distill: hidden-state alignment", "#8172b2", "-"),
          ("baseline", "loss", "baseline: loss (CE only)", "#55a868", "--"))


def plot_training_curves(report: dict, path: Path) -> bool:
    """Per-step losses of the distill stage (total, KD, CE) and of the CE-only baseline, from
    report["curves"][stage][series] = [[step, value], ...]; nats per token against the optimizer step."""
    curves = report.get("curves") or {}
    drawn = [(stage, s, label, c, ls) for stage, s, label, c, ls in CURVES if (curves.get(stage) or {}).get(s)]
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for stage, series, label, colour, ls in drawn:
        pts = [(st, v) for st, v in curves[stage][series] if _finite(v) is not None]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, values, ls, color=colour, lw=1.6, marker="o" if len(steps) <= 30 else None, ms=3,
                label=f"{label} (last {score(values[-1], series)})" if values else label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token (nats)")
    ax.set_title("Training curves", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_students(report: dict, path: Path) -> bool:
    """A run with several students (report["students"], eval.students): x the speedup over the teacher at the
    section's setting, y the retained quality ± one standard error; per student a filled point, and its own CE
    baseline hollow at the same speed, joined by a line (what the KD bought at that size); the teacher at
    (1, 100%); the Pareto front of the students and the teacher as a step line. False with fewer than two
    students, or none with a speedup."""
    section = report.get("students") or {}
    rows = [r for r in section.get("rows") or [] if _finite(r.get("speedup")) is not None
            and _finite(r.get("retained_mean")) is not None]
    if len(section.get("rows") or []) < 2 or not rows:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5.4))
    ax.plot([1.0], [1.0], "o", ms=9, color=ROLES[0][2], label="teacher", zorder=3)
    colours = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        x, y, colour = float(r["speedup"]), float(r["retained_mean"]), colours((i + 1) % 10)
        err = _finite(r.get("retained_stderr"))
        gain, base = _finite(r.get("retained_gain_mean")), _finite(r.get("baseline_retained_mean"))
        text = f"{r['name']} ({si_params(r.get('params'))}): {pct(y)} at {ratio(x)}"
        if gain is not None:
            text += f", gain over CE {pct(gain)}"
        ax.errorbar([x], [y], yerr=None if err is None else [err], fmt="D", ms=8, color=colour, capsize=4,
                    label=text, zorder=3)
        if base is not None:
            ax.plot([x, x], [base, y], color=colour, lw=1, alpha=0.6, zorder=2)
            ax.plot([x], [base], "^", ms=8, mfc="white", mew=1.5, color=colour, zorder=3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted([(1.0, 1.0)] + [(float(r["speedup"]), float(r["retained_mean"])) for r in rows
                                   if r.get("pareto")])
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="#c44e52", alpha=0.4, lw=1.2,
                label="Pareto front", zorder=1)
    ax.plot([], [], "^", mfc="white", color="#555555", label="each student's CE baseline (hollow, same speed)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.9), max(hi, 1.1))
    ax.xaxis.set_major_formatter(RATIO_AXIS)
    ax.yaxis.set_major_formatter(PCT_AXIS)
    ax.set_xlabel(f"speedup over the teacher at {section.get('setting') or 'the headline setting'} (teacher at its "
                  "best: stock or fused kernels)")
    ax.set_ylabel("retained quality (mean of score / teacher's)")
    ax.set_title("Students: quality kept vs speed gained (headline metrics, ± 1 s.e.)", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


PLOTS = (("quality_vs_speedup", plot_quality_vs_speedup), ("quality_per_task", plot_quality_per_task),
         ("training_curves", plot_training_curves), ("students", plot_students))
