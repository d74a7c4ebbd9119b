"""eval/bootstrap.py, eval/per_example.py and the report's headline rule: paired bootstrap intervals checked by
hand and against a direct numpy re-implementation, the headline filter on handcrafted rows, per-example scores
from a real lm-eval run, and the report showing intervals and marks."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.strict_json import dumps_strict
from eval import bootstrap, per_example
from eval.bootstrap import Scores, mean_gain_interval, paired_difference
from eval.headline_metrics import headline_status
from eval.lm_eval_runner import flatten_metrics, run_lm_eval
from eval.report import NULL_REASONS, write_report
from pipelines.stages.report import headline_summary, quality_rows
from tests.test_lm_eval_tasks import heldout_path, tiny_model, tiny_model_dir  # noqa: F401  (fixtures)


def _acc(values: list[float] | np.ndarray) -> Scores:
    return Scores(np.asarray(values, dtype=np.float64), None, "mean")


def _direct(a: np.ndarray, b: np.ndarray, resamples: int, seed: int, stream: str) -> np.ndarray:
    """The resampled differences of mean(a) - mean(b), written out with numpy alone: blocks of 1,000 rows."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stream.encode())]))
    out = []
    for start in range(0, resamples, 1000):
        idx = rng.integers(0, len(a), size=(min(1000, resamples - start), len(a)))
        out.append(a[idx].mean(axis=1) - b[idx].mean(axis=1))
    return np.concatenate(out)


# ------------------------------------------------------------------ the bootstrap itself


def test_two_examples_by_hand() -> None:
    """a = [1, 0], b = [0, 0]: a resample's difference is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the 2.5%
    and 97.5% quantiles of 10,000 resamples are exactly 0 and 1, and about half the draws are 0.5."""
    a, b = _acc([1, 0]), _acc([0, 0])
    ci = paired_difference(a, b, resamples=10_000, seed=7, stream="hand")
    assert ci["estimate"] == 0.5 and ci["low"] == 0.0 and ci["high"] == 1.0 and not ci["excludes_zero"]
    draws = _direct(a.values, b.values, 10_000, 7, "hand")
    assert abs(np.mean(draws == 0.5) - 0.5) < 0.02 and abs(np.mean(draws == 0.0) - 0.25) < 0.02
    # The standard deviation of the draws is the closed form's: sd of (1, 0) / sqrt(2) = 0.5 / sqrt(2).
    assert ci["stderr"] == pytest.approx(0.5 / math.sqrt(2), rel=0.03)


def test_matches_a_direct_numpy_reimplementation() -> None:
    """The same seed gives the same interval, to the last digit, as numpy's own resampling and quantiles
    (2,500 resamples: more than one block of indices)."""
    rng = np.random.default_rng(0)
    a, b = (rng.random(37) < 0.6).astype(float), (rng.random(37) < 0.45).astype(float)
    ci = paired_difference(_acc(a), _acc(b), resamples=2_500, seed=3, stream="arc_easy")
    draws = _direct(a, b, 2_500, 3, "arc_easy")
    assert (ci["low"], ci["high"]) == tuple(np.quantile(draws, [0.025, 0.975]))
    assert ci["stderr"] == np.std(draws, ddof=1) and ci["estimate"] == a.mean() - b.mean()
    assert ci["resamples"] == 2_500 and ci["seed"] == 3 and ci["method"] == "percentile" and ci["n"] == 37
    # Another stream (task) draws other examples.
    other = paired_difference(_acc(a), _acc(b), resamples=2_500, seed=3, stream="piqa")
    assert (other["low"], other["high"], other["stderr"]) != (ci["low"], ci["high"], ci["stderr"])


def test_a_clear_difference_excludes_zero_and_none_includes_it() -> None:
    rng = np.random.default_rng(1)
    base = (rng.random(200) < 0.3).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1.0  # 40 more right answers of 200, none lost: +20 points
    clear = paired_difference(_acc(better), _acc(base))
    assert clear["excludes_zero"] and clear["low"] > 0.1 and clear["estimate"] == pytest.approx(0.2)
    same_rate = base[rng.permutation(200)]  # the same accuracy on shuffled examples: no real difference
    none = paired_difference(_acc(same_rate), _acc(base))
    assert none["estimate"] == 0.0 and none["low"] < 0 < none["high"] and not none["excludes_zero"]
    worse = paired_difference(_acc(base), _acc(better))  # and the other sign
    assert worse["excludes_zero"] and worse["high"] < -0.1


def test_ratio_metric_resamples_documents_and_recomputes_the_ratio_of_sums() -> None:
    """Bits per byte: documents are resampled with their byte counts; each resample is -sum(ll)/sum(bytes)/ln 2,
    not a mean of per-document bits per byte."""
    ll_a, ll_b = np.array([-100.0, -900.0, -50.0]), np.array([-110.0, -950.0, -52.0])
    size = np.array([50.0, 400.0, 30.0])
    a, b = Scores(ll_a, size, "bits_per_byte"), Scores(ll_b, size, "bits_per_byte")
    assert bootstrap.score(a) == pytest.approx(1050 / 480 / math.log(2))
    ci = paired_difference(a, b, resamples=1_000, seed=5, stream="heldout_text")
    rng = bootstrap.rng_for(5, "heldout_text")
    idx = rng.integers(0, 3, size=(1000, 3))
    direct = (-ll_a[idx].sum(1) / size[idx].sum(1) + ll_b[idx].sum(1) / size[idx].sum(1)) / math.log(2)
    # Equal up to the order of floating-point operations (the difference of two ratios, written differently).
    assert [ci["low"], ci["high"]] == pytest.approx(list(np.quantile(direct, [0.025, 0.975])), rel=1e-12)
    assert ci["high"] < 0 and ci["excludes_zero"]  # a's log-likelihoods are higher on every document
    with pytest.raises(ValueError, match="counts"):
        Scores(ll_a, None, "bits_per_byte")
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(a, _acc([1, 0]))


def test_mean_gain_interval() -> None:
    """A teacher that is always right over a baseline always wrong: each resample's gain is the student's
    resampled accuracy, so the interval is that of the student's score on the task's own stream. Two such
    tasks average; a task whose teacher never beats the baseline makes every resample undefined."""
    s1 = np.array([1.0, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    ones, zeros = _acc(np.ones(10)), _acc(np.zeros(10))
    one = mean_gain_interval([("t1", ones, _acc(s1), zeros, True)], resamples=1_000, seed=9)
    idx = bootstrap.rng_for(9, "t1").integers(0, 10, size=(1000, 10))
    assert (one["low"], one["high"]) == tuple(np.quantile(s1[idx].mean(1), [0.025, 0.975]))
    assert one["estimate"] == pytest.approx(0.7) and one["undefined_share"] == 0.0 and one["tasks"] == 1

    s2 = np.array([0.0, 0, 1, 0, 0, 0, 1, 0, 0, 0])
    two = mean_gain_interval([("t1", ones, _acc(s1), zeros, True), ("t2", ones, _acc(s2), zeros, True)],
                             resamples=1_000, seed=9)
    idx2 = bootstrap.rng_for(9, "t2").integers(0, 10, size=(1000, 10))
    both = (s1[idx].mean(1) + s2[idx2].mean(1)) / 2
    assert (two["low"], two["high"]) == tuple(np.quantile(both, [0.025, 0.975]))
    assert two["estimate"] == pytest.approx(0.45)

    flat = mean_gain_interval([("t", zeros, _acc(s1), zeros, True)], resamples=100)
    assert flat["undefined_share"] == 1.0 and math.isnan(flat["low"]) and math.isnan(flat["estimate"])
    assert math.isnan(mean_gain_interval([], resamples=10)["estimate"])


# ------------------------------------------------------------------ the headline rule


def _flat(value: float, stderr: float | None, higher: bool = True) -> dict[str, Any]:
    return {"value": value, "stderr": stderr, "higher_is_better": higher}


def _handcrafted() -> tuple[dict[str, Any], dict[str, Any]]:
    """Four tasks' flat metrics for four models, and per-example scores for teacher, student and baseline:
    piqa (teacher far above chance and the baseline), arc_easy (teacher at chance), hellaswag (teacher above
    chance, level with the baseline), heldout_text bits per byte (the teacher worse than the baseline)."""
    n = 200
    rng = np.random.default_rng(11)
    piqa_b = (rng.random(n) < 0.55).astype(float)
    piqa_t = np.maximum(piqa_b, (rng.random(n) < 0.6).astype(float))  # ~82%
    piqa_s = np.where(rng.random(n) < 0.5, piqa_t, piqa_b)
    arc_t = (rng.random(n) < 0.26).astype(float)
    hs_b = (rng.random(n) < 0.45).astype(float)
    hs_t = hs_b[rng.permutation(n)]
    size = rng.integers(200, 800, n).astype(float)
    ll_b = -size * math.log(2) * 1.00
    ll_t = -size * math.log(2) * 1.05
    arrays = {"teacher": {"piqa/acc": piqa_t, "arc_easy/acc": arc_t, "hellaswag/acc": hs_t},
              "student": {"piqa/acc": piqa_s, "arc_easy/acc": arc_t, "hellaswag/acc": hs_b},
              "baseline": {"piqa/acc": piqa_b, "arc_easy/acc": arc_t, "hellaswag/acc": hs_b}}
    bpb = {"teacher": ll_t, "student": (ll_t + ll_b) / 2, "baseline": ll_b}
    scores: dict[str, Any] = {"student_init": {}}
    per: dict[str, Any] = {}
    ids = list(range(n))
    for role in ("teacher", "student", "baseline"):
        scores[role] = {k: (ids, _acc(v)) for k, v in arrays[role].items()}
        scores[role]["heldout_text/bits_per_byte"] = (ids, Scores(bpb[role], size, "bits_per_byte"))
        per[role] = {k: _flat(s.values.mean(), float(np.std(s.values, ddof=1) / math.sqrt(n)))
                     for k, (_, s) in scores[role].items() if k.endswith("/acc")}
        per[role]["heldout_text/bits_per_byte"] = _flat(bootstrap.score(scores[role]["heldout_text/bits_per_byte"][1]),
                                                        None, higher=False)
    per["student_init"] = {k: _flat(0.3 if k.endswith("acc") else 1.5, None, k.endswith("acc"))
                           for k in per["teacher"]}
    return per, scores


def test_headline_rule_on_handcrafted_rows() -> None:
    per, scores = _handcrafted()
    quality = quality_rows(per, scores)
    marks = {k: q["headline"]["reason"] for k, q in quality.items()}
    assert marks == {"piqa/acc": "counted", "arc_easy/acc": "not counted: teacher within 2 s.e. of chance",
                     "hellaswag/acc": "not counted: teacher within 2 s.e. of the baseline",
                     "heldout_text/bits_per_byte": "not counted: teacher worse than the baseline"}
    assert quality["piqa/acc"]["student_minus_baseline"]["excludes_zero"]
    assert not quality["arc_easy/acc"]["student_minus_baseline"]["excludes_zero"]  # identical answers: [0, 0]
    summary = headline_summary(quality, scores)
    assert summary["headline"]["counted"] == 1 and summary["headline"]["tasks"] == 4
    assert summary["headline"]["metrics"] == ["piqa/acc"]
    assert summary["retained_mean"] == pytest.approx(quality["piqa/acc"]["retained"])
    assert summary["retained_gain_mean"] == pytest.approx(quality["piqa/acc"]["retained_gain"])
    ci = summary["retained_gain_mean_ci"]
    assert ci["tasks"] == 1 and ci["low"] < summary["retained_gain_mean"] < ci["high"]
    assert ci["estimate"] == pytest.approx(summary["retained_gain_mean"])

    # Without a baseline only chance is tested: bits per byte (no chance level) and hellaswag now count.
    no_base = quality_rows({**per, "baseline": None}, scores)
    assert {k for k, q in no_base.items() if q["headline"]["counted"]} == {
        "piqa/acc", "hellaswag/acc", "heldout_text/bits_per_byte"}
    assert "student_minus_baseline" not in no_base["piqa/acc"]
    assert "retained_gain_mean" not in headline_summary(no_base, scores)


def test_headline_status_edges() -> None:
    """Below chance, no standard error, and lm-eval's standard errors when no per-example scores exist."""
    assert headline_status({"teacher": 0.1, "retained": 1.0, "chance": 0.5, "stderr": {"teacher": 0.05}}) == (
        False, "not counted: teacher below chance")
    assert headline_status({"teacher": 0.9, "retained": 1.0, "chance": 0.5, "stderr": {}})[0] is False
    assert headline_status({"teacher": 0.0, "retained": float("nan")}) == (
        False, "not counted: no defined retained value")
    row = {"teacher": 0.8, "retained": 0.9, "chance": 0.5, "baseline": 0.7,
           "stderr": {"teacher": 0.03, "baseline": 0.03}}
    assert headline_status(row) == (True, "counted")  # 0.1 > 2 * sqrt(0.03² + 0.03²) = 0.085
    assert headline_status({**row, "baseline": 0.72})[1] == "not counted: teacher within 2 s.e. of the baseline"
    # Lower is better: a teacher with fewer bits per byte than the baseline by more than 2 s.e. counts.
    bpb = {"teacher": 1.0, "retained": 0.9, "baseline": 1.2, "higher_is_better": False,
           "teacher_minus_baseline": {"stderr": 0.05}}
    assert headline_status(bpb) == (True, "counted")
    assert headline_status({"teacher": 1.0, "retained": 0.9, "higher_is_better": False}) == (True, "counted")


# ------------------------------------------------------------------ per-example scores from lm-eval


@pytest.mark.slow
def test_per_example_scores_of_a_real_lm_eval_run(tiny_model: tuple[Any, Any], heldout_path: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    """run_lm_eval logs every example; the compact files hold doc id -> value (no prompts), and the metric
    recomputed from them equals lm-eval's own aggregate for every metric, bits per byte included."""
    model, tokenizer = tiny_model
    raw = run_lm_eval(model, tokenizer, ["local_arc_easy", "local_lambada_openai", "local_heldout_text"], limit=4,
                      batch_size=4, metadata={"heldout_path": str(heldout_path)})
    paths = per_example.write(tmp_path / "per_example", per_example.from_samples(raw["samples"]))
    assert [p.name for p in paths] == ["arc_easy.json", "heldout_text.json", "lambada_openai.json"]
    record = json.loads(paths[0].read_text())
    assert record["doc_ids"] == [0, 1, 2, 3] and set(record["metrics"]) == {"acc", "acc_norm"}
    assert set(record["metrics"]["acc"]["values"]) <= {0.0, 1.0}
    assert "Question" not in paths[0].read_text() and paths[0].stat().st_size < 400
    held = json.loads(paths[1].read_text())
    assert held["doc_ids"] == [0, 1] and held["metrics"]["bits_per_byte"]["aggregation"] == "bits_per_byte"
    assert held["metrics"]["bits_per_byte"]["counts"][0] == len(
        "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.".encode())

    flat = flatten_metrics(raw)
    read = per_example.read(tmp_path / "per_example")
    assert set(read) == set(flat)  # every reported metric has its examples
    for key, (ids, scores) in read.items():
        assert bootstrap.score(scores) == pytest.approx(flat[key]["value"], rel=1e-9), key
    assert per_example.read(tmp_path / "absent") == {}


# ------------------------------------------------------------------ the report


def test_report_shows_intervals_and_marks(tmp_path: Path) -> None:
    per, scores = _handcrafted()
    quality = quality_rows(per, scores)
    summary = headline_summary(quality, scores)
    report = {"run": {"name": "honest"}, "quality": quality,
              "summary": {"retained_mean": summary.pop("retained_mean"), "speedup": 2.0,
                          "speedup_setting": "decode_b1", **summary}}
    text = dumps_strict(report, NULL_REASONS)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))
    assert back["summary"]["headline"]["not_counted"]["arc_easy/acc"].startswith("not counted")
    assert back["quality"]["arc_easy/acc"]["retained_gain"] is None  # teacher level with the baseline

    files = write_report(back, tmp_path)
    md, page = files["md"].read_text(), files["html"].read_text()
    piqa = quality["piqa/acc"]["student_minus_baseline"]
    cell = f"+{100 * piqa['estimate']:.1f}% [+{100 * piqa['low']:.1f}%, +{100 * piqa['high']:.1f}%] (excludes 0)"
    assert f"| {cell} | counted |" in md
    assert "| +0.0% [+0.0%, +0.0%] | not counted: teacher within 2 s.e. of chance |" in md
    assert "not counted: teacher worse than the baseline |" in md
    assert "student − baseline [95% CI]" in md and "| headline |" in md
    assert "over 1 of 4 tasks" in md and "Headline: 1 of 4 tasks count (`piqa/acc`)" in md
    assert "10,000 resamples (seed 20261201), percentile 95% interval" in md
    assert "averaged over one counted headline metric per task (`piqa/acc`)" in md  # the plot's caption
    gci = summary["retained_gain_mean_ci"]
    assert f"95% bootstrap interval [{100 * gci['low']:.1f}%, {100 * gci['high']:.1f}%]" in md
    for snippet in ("(excludes 0)", "not counted: teacher within 2 s.e. of chance", "student − baseline [95% CI]",
                    "Headline: 1 of 4 tasks count"):
        assert snippet in page, snippet

    # Nothing counts: no retained figure, and the report says why instead of averaging noise.
    for q in back["quality"].values():
        if "headline" in q:
            q["headline"] = {"counted": False, "reason": "not counted: teacher within 2 s.e. of chance"}
    back["summary"].update(retained_mean=None, headline={**back["summary"]["headline"], "counted": 0, "metrics": []})
    md = write_report(back, tmp_path / "none")["md"].read_text()
    assert "No task counts in the headline retained quality (0 of 4 tasks" in md
