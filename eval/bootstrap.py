"""Paired bootstrap intervals over lm-eval's per-example scores: how sure a difference between two models is.

Every model is scored on the same examples of a task (the same doc ids), so the differences are paired: one
resample draws n example indices with replacement, and the teacher, the student and the baseline are all
re-scored on those same examples. A metric's score on a resample is recomputed the way lm-eval aggregates it
(`aggregate`): the mean of per-example values for accuracies; for the held-out text's bits per byte, the
ratio of the summed log-likelihoods to the summed bytes, so documents (not bytes) are the resampled unit.

Intervals are percentile intervals (the `level` central quantiles of the resampled statistic, numpy's linear
interpolation), from `RESAMPLES` resamples drawn by numpy's PCG64 generator seeded with `SEED` and a stable
hash of the task's name, so a report is reproducible to the last digit and the tasks draw independent streams.
Indices are drawn in blocks of `BLOCK` resamples (memory stays bounded on a 14,000-question task); a block of
b resamples is one `rng.integers(0, n, size=(b, n))` call, in order.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
SEED = 20261201
LEVEL = 0.95
BLOCK = 1_000  # resamples per drawn block of indices: BLOCK x n int64 at a time
METHOD = "percentile"

# lm-eval 0.4.13's aggregation of each per-example metric of our tasks (lm_eval/api/metrics.py); a metric
# not named here is a per-example value averaged ("mean": acc, acc_norm, exact_match).
AGGREGATIONS = {"perplexity": "perplexity", "word_perplexity": "weighted_perplexity",
                "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte"}
# Aggregations over (log-likelihood, count) pairs: a ratio of sums.
RATIO_AGGREGATIONS = frozenset({"weighted_perplexity", "bits_per_byte"})


@dataclass(frozen=True)
class Scores:
    """One model's per-example scores on one metric of one task.

    values: (n,) float64, the per-example value (0/1 for an accuracy; a log-likelihood in nats for the
        perplexities and bits per byte).
    counts: (n,) float64 for ratio aggregations (bytes or words per document), else None.
    aggregation: "mean", "perplexity", "weighted_perplexity" or "bits_per_byte" (lm-eval's names).
    """

    values: np.ndarray
    counts: np.ndarray | None
    aggregation: str

    def __post_init__(self) -> None:
        if self.aggregation in RATIO_AGGREGATIONS and self.counts is None:
            raise ValueError(f"aggregation {self.aggregation!r} needs per-example counts")
        if self.counts is not None and self.counts.shape != self.values.shape:
            raise ValueError(f"counts {self.counts.shape} and values {self.values.shape} differ in shape")

    @property
    def n(self) -> int:
        return int(self.values.shape[0])


def aggregate(aggregation: str, values: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """lm-eval's aggregate of per-example values over the last axis.

    values, counts: (..., n). Returns (...): "mean" the mean; "perplexity" exp(-mean); "weighted_perplexity"
    exp(-sum(values) / sum(counts)); "bits_per_byte" -sum(values) / sum(counts) / ln 2.
    """
    if aggregation == "mean":
        return values.mean(axis=-1)
    if aggregation == "perplexity":
        return np.exp(-values.mean(axis=-1))
    if counts is None:
        raise ValueError(f"aggregation {aggregation!r} needs per-example counts")
    if aggregation == "weighted_perplexity":
        return np.exp(-values.sum(axis=-1) / counts.sum(axis=-1))
    if aggregation == "bits_per_byte":
        return -values.sum(axis=-1) / counts.sum(axis=-1) / math.log(2)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def score(s: Scores) -> float:
    """The metric on all of `s`'s examples (equals lm-eval's reported value)."""
    return float(aggregate(s.aggregation, s.values, s.counts))


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """The generator of one task's resamples: PCG64 seeded with (seed, crc32 of the stream's name)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(stream.encode("utf-8"))]))


def index_blocks(n: int, resamples: int, rng: np.random.Generator, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Bootstrap indices, (b, n) int64 per block with b <= block, `resamples` rows in all."""
    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def resampled(models: Sequence[Scores], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Each model's metric on the same bootstrap resamples of their (paired) examples.

    models: m Scores over the same n examples, in the same order. Returns (m, resamples) float64.
    """
    n = models[0].n
    if any(m.n != n for m in models):
        raise ValueError(f"paired scores need the same examples: sizes {[m.n for m in models]}")
    if n == 0:
        raise ValueError("no examples to resample")
    out = np.empty((len(models), resamples))
    done = 0
    for idx in index_blocks(n, resamples, rng):
        b = idx.shape[0]
        for i, m in enumerate(models):
            out[i, done:done + b] = aggregate(m.aggregation, m.values[idx],
                                              None if m.counts is None else m.counts[idx])
        done += b
    return out


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of draws (B,), ignoring NaN: numpy quantiles (1-level)/2 and
    (1+level)/2, linear interpolation. (NaN, NaN) when no draw is finite."""
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: Scores, b: Scores, resamples: int = RESAMPLES, seed: int = SEED, stream: str = "",
                      level: float = LEVEL) -> dict[str, float | int | bool | str]:
    """Bootstrap interval of score(a) - score(b) over paired examples (the same resampled indices for both).

    Returns {"estimate": the difference on all examples, "low", "high": the percentile interval, "stderr": the
    standard deviation of the resampled differences, "excludes_zero": low > 0 or high < 0, "n": examples,
    "resamples", "seed", "level", "method": "percentile"}.
    """
    draws = resampled([a, b], resamples, rng_for(seed, stream))
    diff = draws[0] - draws[1]
    lo, hi = percentile_interval(diff, level)
    return {"estimate": score(a) - score(b), "low": lo, "high": hi, "stderr": float(np.std(diff, ddof=1))
            if resamples > 1 else float("nan"), "excludes_zero": bool(lo > 0 or hi < 0), "n": a.n,
            "resamples": int(resamples), "seed": int(seed), "level": float(level), "method": METHOD}


def gains(teacher: np.ndarray, student: np.ndarray, baseline: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Retained gain (student - baseline) / (teacher - baseline) elementwise; NaN where the teacher is not
    better than the baseline (as eval.retained.retained_gain). All arrays of one shape (...,)."""
    edge = (teacher - baseline) * (1.0 if higher_is_better else -1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (student - baseline) / (teacher - baseline)
    return np.where(edge > 0, g, np.nan)


def mean_gain_interval(tasks: Sequence[tuple[str, Scores, Scores, Scores, bool]], resamples: int = RESAMPLES,
                       seed: int = SEED, level: float = LEVEL) -> dict[str, float | int | str]:
    """Bootstrap interval of the mean retained gain over tasks.

    tasks: (stream name, teacher, student, baseline, higher_is_better) per task; each task's three Scores
    over the same n_t examples. Within each task the examples are resampled jointly for the three models
    (stream = the task's name, so the draws are those of `paired_difference` on that task); tasks are
    resampled independently; each resample recomputes every task's retained gain and their mean. A resample
    in which some task's teacher is not better than its baseline has no defined mean: it is left out, and
    `undefined_share` says how many were. Returns {"estimate", "low", "high", "undefined_share", "tasks",
    "resamples", "seed", "level", "method"}; NaN estimate when `tasks` is empty.
    """
    if not tasks:
        return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "undefined_share": 1.0,
                "tasks": 0, "resamples": int(resamples), "seed": int(seed), "level": float(level), "method": METHOD}
    per_task, point = [], []
    for stream, t, s, b, hib in tasks:
        draws = resampled([t, s, b], resamples, rng_for(seed, stream))
        per_task.append(gains(draws[0], draws[1], draws[2], hib))
        point.append(float(gains(np.array(score(t)), np.array(score(s)), np.array(score(b)), hib)))
    mean = np.mean(np.stack(per_task), axis=0)  # NaN where any task's gain is undefined
    lo, hi = percentile_interval(mean, level)
    return {"estimate": float(np.mean(point)), "low": lo, "high": hi,
            "undefined_share": float(np.mean(~np.isfinite(mean))), "tasks": len(tasks),
            "resamples": int(resamples), "seed": int(seed), "level": float(level), "method": METHOD}


def mean_gain_difference(tasks: Sequence[tuple[str, Scores, Scores, Scores, Scores, bool]],
                         resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """Bootstrap interval of mean retained gain(a) - mean retained gain(b), two students against one teacher and
    one baseline.

    tasks: (stream name, teacher, a, b, baseline, higher_is_better) per task, the four Scores over the same
    examples. The four models are resampled jointly within a task (stream = the task's name, so these are the
    draws `mean_gain_interval` makes for each student alone) and tasks independently. Returns {"estimate",
    "low", "high", "excludes_zero", "undefined_share", "tasks", "resamples", "seed", "level", "method"}.
    """
    if not tasks:
        return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "excludes_zero": False,
                "undefined_share": 1.0, "tasks": 0, "resamples": int(resamples), "seed": int(seed),
                "level": float(level), "method": METHOD}
    per_task, point = [], []
    for stream, t, a, b, base, hib in tasks:
        d = resampled([t, a, b, base], resamples, rng_for(seed, stream))
        per_task.append(gains(d[0], d[1], d[3], hib) - gains(d[0], d[2], d[3], hib))
        st, sa, sb, sbase = (np.array(score(x)) for x in (t, a, b, base))
        point.append(float(gains(st, sa, sbase, hib) - gains(st, sb, sbase, hib)))
    mean = np.mean(np.stack(per_task), axis=0)
    lo, hi = percentile_interval(mean, level)
    return {"estimate": float(np.mean(point)), "low": lo, "high": hi, "excludes_zero": bool(lo > 0 or hi < 0),
            "undefined_share": float(np.mean(~np.isfinite(mean))), "tasks": len(tasks),
            "resamples": int(resamples), "seed": int(seed), "level": float(level), "method": METHOD}
