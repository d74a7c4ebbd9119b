"""The headline metric of each task: the one score per task that summary plots average over.

A task reports several metrics, some of them the same quantity in another form (held-out text: word
perplexity, byte perplexity and bits per byte are monotone transforms of one log-likelihood), so averaging
every metric would count a task several times. Each task contributes its first metric in `PREFERENCE`
(lm-eval's own primary metrics), else its first metric in name order.

Of those, `headline_status` says which count in the report's headline means (`RULE`): a task where the teacher
is indistinguishable from guessing or from the baseline measures noise, not what distillation kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

PREFERENCE = ("acc", "bits_per_byte", "exact_match", "acc_norm", "word_perplexity", "perplexity")


def headline_metrics(keys: Iterable[str]) -> list[str]:
    """From report metric keys 'task/metric', one key per task (sorted by task): its preferred metric."""
    by_task: dict[str, list[str]] = {}
    for key in keys:
        task, _, metric = key.rpartition("/")
        by_task.setdefault(task, []).append(metric)
    out = []
    for task in sorted(by_task):
        metrics = sorted(by_task[task])
        best = next((m for m in PREFERENCE if m in metrics), metrics[0])
        out.append(f"{task}/{best}" if task else best)
    return out


# The margin a teacher must clear, in standard errors, for its task to count in the headline means.
MARGIN_SE = 2.0

RULE = ("A task counts in the headline means when its teacher is above chance (multiple-choice accuracies) and "
        "above the baseline (runs with one) by more than 2 standard errors: the teacher's lm-eval standard error "
        "against chance, the paired bootstrap standard error of teacher minus baseline against the baseline. "
        "A metric without a chance level (bits per byte, perplexity, LAMBADA) skips that test; without a "
        "baseline, the baseline test is skipped (so held-out bits per byte then always counts).")


def _f(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def headline_status(row: dict[str, Any]) -> tuple[bool, str]:
    """Whether a report quality row (a headline metric) counts in the headline means, and why not.

    Reads row["teacher"], ["higher_is_better"], ["retained"], ["chance"] (absent: no chance level),
    ["baseline"] (absent: no baseline), ["stderr"]["teacher"/"baseline"] (lm-eval's) and
    ["teacher_minus_baseline"]["stderr"] (the paired bootstrap's; preferred over the lm-eval standard errors
    combined as independent). Returns (True, "counted") or (False, "not counted: <reason>").
    """
    t = _f(row.get("teacher"))
    if t is None or _f(row.get("retained")) is None:
        return False, "not counted: no defined retained value"
    hib = bool(row.get("higher_is_better", True))
    sign = 1.0 if hib else -1.0
    err = row.get("stderr") or {}
    chance = _f(row.get("chance"))
    if chance is not None:
        se = _f(err.get("teacher"))
        if se is None:
            return False, "not counted: no standard error for the teacher to compare with chance"
        if (t - chance) * sign <= MARGIN_SE * se:
            where = "below chance" if (t - chance) * sign < -MARGIN_SE * se else "within 2 s.e. of chance"
            return False, f"not counted: teacher {where}"
    if "baseline" in row:
        b = _f(row.get("baseline"))
        se = _f((row.get("teacher_minus_baseline") or {}).get("stderr"))
        if se is None:
            st, sb = _f(err.get("teacher")), _f(err.get("baseline"))
            se = math.sqrt(st * st + sb * sb) if st is not None and sb is not None else None
        if b is None or se is None:
            return False, "not counted: no standard error for teacher minus baseline"
        if (t - b) * sign <= MARGIN_SE * se:
            where = "worse than the baseline" if (t - b) * sign < -MARGIN_SE * se else \
                "within 2 s.e. of the baseline"
            return False, f"not counted: teacher {where}"
    return True, "counted"
