"""The students of one run side by side: per student its quality kept, its gain over its own cross-entropy
baseline (with the interval), its speedups, and which students sit on the quality-vs-speed Pareto front.

Everything is read from each student's report dict (pipelines/stages/report.py), so the section can be rebuilt
from the report files alone.
"""
from __future__ import annotations

import math
from typing import Any

from eval.latency import HEADLINE_SETTINGS
from eval.pareto import pareto_front
from eval.report_plots import model_points

# The setting whose speedup places a student on the front and decides "at least 2x faster" is the report's
# headline one: decode at batch 1, each model on its fastest path where two or more were timed, else on plain generate.
# The first of HEADLINE_SETTINGS that every student has is used, so that all of them are placed alike.
TARGET_SPEEDUP = 2.0


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.nan


def student_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One student's row from its report: {"name", "model" (how it was built), "params", "retained_mean" (over the
    counted headline metrics; where none counts, over every headline metric, as the report's plot does) and its
    "retained_stderr", "baseline_retained_mean" (its CE baseline's, same metrics), "retained_gain_mean" and
    "retained_gain_mean_ci" (where a baseline was trained and a metric counts), "counted" (how many metrics the
    headline counts), "speedups" ({latency setting: student over the teacher at its best}, decode and prefill
    settings), "speedup" (at the first of HEADLINE_SETTINGS it has, NaN when none was measured)}."""
    summary = report.get("summary") or {}
    student = report.get("student") or {}
    points = {p["role"]: p for p in model_points(report)}
    latency = report.get("latency") or {}
    speedups = {k: _finite(e.get("speedup")) for k, e in sorted(latency.items())
                if k.startswith(("decode", "prefill")) and math.isfinite(_finite(e.get("speedup")))}
    retained = _finite(summary.get("retained_mean"))
    if math.isnan(retained):  # no metric counted: over every headline metric, as the report's own plot does
        retained = _finite((points.get("student") or {}).get("retained"))
    return {"name": name, "model": student.get("name", "?"), "params": student.get("params_total"),
            "retained_mean": retained,
            "retained_stderr": _finite((points.get("student") or {}).get("stderr")),
            "baseline_retained_mean": _finite((points.get("baseline") or {}).get("retained")),
            "retained_gain_mean": _finite(summary.get("retained_gain_mean")),
            "retained_gain_mean_ci": summary.get("retained_gain_mean_ci"),
            "counted": (summary.get("headline") or {}).get("counted", 0),
            "speedups": speedups,
            "speedup": next((speedups[k] for k in HEADLINE_SETTINGS if k in speedups), math.nan)}


def students_section(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's "students" section from student_row rows (the main student first): the rows, each marked
    "pareto" (on the speedup-vs-retained-quality front), and "largest_at_target": the name of the student with
    the most parameters among those at least TARGET_SPEEDUP times faster at "setting" (the first of
    HEADLINE_SETTINGS every student has; each row's "speedup" is at it) (None when none is),
    the one whose numbers answer "how much do I keep at 2x"."""
    setting = next((k for k in HEADLINE_SETTINGS if rows and all(k in (r.get("speedups") or {}) for r in rows)),
                   HEADLINE_SETTINGS[-1])
    rows = [{**r, "speedup": (r.get("speedups") or {}).get(setting, math.nan)} for r in rows]
    flags = pareto_front([(r["speedup"], r["retained_mean"]) for r in rows])
    rows = [{**r, "pareto": on} for r, on in zip(rows, flags)]
    fast = [r for r in rows if r["speedup"] >= TARGET_SPEEDUP and isinstance(r["params"], (int, float))]
    largest = max(fast, key=lambda r: r["params"])["name"] if fast else None
    return {"rows": rows, "setting": setting, "target_speedup": TARGET_SPEEDUP, "largest_at_target": largest}
