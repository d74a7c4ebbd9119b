"""How much of the teacher's quality a student keeps: the report's two ratios, retained and retained gain."""

from __future__ import annotations


def retained_value(teacher: float, student: float, higher_is_better: bool) -> float:
    """Share of the teacher's quality the student keeps: student/teacher, or teacher/student when lower is
    better (perplexity, bits per byte), so 1.0 = parity and > 1 = the student is better. NaN if undefined."""
    num, den = (student, teacher) if higher_is_better else (teacher, student)
    if den is None or num is None or den == 0:
        return float("nan")
    return float(num) / float(den)


def retained_stderr(teacher: float, student: float, student_err: float, higher_is_better: bool) -> float:
    """Standard error of `retained_value` from the student's own standard error, the teacher's score taken as
    the fixed reference (first-order: err/teacher, or teacher*err/student² when lower is better). NaN if
    undefined."""
    try:
        t, s, e = float(teacher), float(student), float(student_err)
    except (TypeError, ValueError):
        return float("nan")
    if higher_is_better:
        return e / t if t else float("nan")
    return t * e / (s * s) if s else float("nan")


def retained_gain(teacher: float, student: float, baseline: float, higher_is_better: bool = True) -> float:
    """How much of the teacher's advantage over the baseline (the same student trained without the teacher)
    the distilled student recovers: (student - baseline) / (teacher - baseline). 1.0 = all of it, 0 = none,
    < 0 = distillation hurt; the same formula holds for lower-is-better metrics. NaN when the teacher has
    no advantage to recover (it is not better than the baseline), where the ratio would mislead."""
    if teacher is None or student is None or baseline is None:
        return float("nan")
    edge = (float(teacher) - float(baseline)) * (1 if higher_is_better else -1)
    if edge <= 0:
        return float("nan")
    return (float(student) - float(baseline)) / (float(teacher) - float(baseline))
