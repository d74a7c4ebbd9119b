"""`moe-distill ab`: variants checked before any stage, the bootstrap of a difference in mean retained gain, and
one comparison on the ci preset end to end."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from tests.mlflow_store import fresh_store


@pytest.mark.parametrize("name, spec, message", [
    ("a", "data.seq_len=32", "only distill.* settings differ between variants"),
    ("a", "distill.max_steps=4", "distill.max_steps would change the budget"),
    ("a/b", "distill.lr=1e-4", "variant name 'a/b'"),
    ("a", "missing.yaml", "missing.yaml is not a file"),
])
def test_a_variant_that_would_not_compare_is_refused(name: str, spec: str, message: str) -> None:
    from pipelines.ab import parse_variant

    with pytest.raises(ConfigError, match=message):
        parse_variant(name, spec)


def test_a_preset_file_gives_its_distill_section(tmp_path: Path) -> None:
    from pipelines.ab import parse_variant

    good = tmp_path / "best.yaml"
    good.write_text("base: smoke\ndistill:\n  loss: jsd\n  beta: 0.3\n")
    assert parse_variant("best", str(good)).distill == {"loss": "jsd", "beta": 0.3}
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: smoke\n")
    with pytest.raises(ConfigError, match="no `distill:` section"):
        parse_variant("bad", str(bad))


def test_mean_gain_difference_is_the_difference_of_the_means_and_pairs_the_draws() -> None:
    from eval.bootstrap import Scores, mean_gain_difference, mean_gain_interval

    rng = np.random.default_rng(0)

    def acc(p: float) -> Scores:
        return Scores((rng.random(300) < p).astype(float), None, "mean")

    t, b = acc(0.8), acc(0.4)
    a1, a2 = acc(0.7), acc(0.5)
    d = mean_gain_difference([("task", t, a1, a2, b, True)])
    g1 = mean_gain_interval([("task", t, a1, b, True)])["estimate"]
    g2 = mean_gain_interval([("task", t, a2, b, True)])["estimate"]
    assert d["estimate"] == pytest.approx(g1 - g2) and d["low"] < d["estimate"] < d["high"]
    same = mean_gain_difference([("task", t, a1, a1, b, True)])
    assert same["estimate"] == 0 and same["low"] == 0 and same["high"] == 0 and not same["excludes_zero"]


def test_bad_input_is_one_line_and_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main

    assert main(["ab", "--preset", "ci", "--runs-dir", str(tmp_path), "--variant", "a", "",
                 "--variant", "b", "distill.batch_size=4"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error (config): variant b: distill.batch_size would change") and "\n" not in err
    assert main(["ab", "--preset", "ci", "--runs-dir", str(tmp_path), "--variant", "a", "",
                 "--variant", "b", "distill.on_policy_rate=2"]) == 3
    assert "variant b: distill.on_policy_rate must be in [0, 1]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written before the variants are checked


@pytest.mark.slow
def test_two_recipes_side_by_side_on_the_ci_preset(tiny_moe_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    from kernels import kd_loss
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)
    args = ["ab", "--preset", "ci", "--teacher", str(tiny_moe_dir), "--run-name", "abrun", "--runs-dir",
            str(tmp_path / "runs"), "--set", "latency.enabled=false eval.limit=4",
            "--variant", "cache", "", "--variant", "otp",
            "distill.on_policy_rate=0.5 distill.on_policy_prompt=16 distill.on_policy_tokens=24"]
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "abrun" / "ab"
    table = json.loads((folder / "ab.json").read_text())
    assert table["reference"] == "cache" and set(table["variants"]) == {"cache", "otp"}
    cache, otp = table["variants"]["cache"], table["variants"]["otp"]
    assert otp["trained_tokens"] < cache["trained_tokens"]  # on-policy steps learn only the sampled positions
    assert "minus_reference" in otp and "minus_reference" not in cache
    for v in ("cache", "otp"):
        assert (folder / v / "distill" / "model" / "model.safetensors").exists()
        assert (folder / v / "eval_student" / "metrics.json").exists()
    md = (folder / "ab.md").read_text()
    assert "| otp | on_policy_rate=0.5" in md and "comparison:" in out
    # A rerun reuses everything: the shared stages and each variant's.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "[distill] inputs unchanged" in again and "[eval_student] inputs unchanged" in again
    assert "running (inputs" not in again


def test_the_comparison_counts_the_headline_metrics_and_names_a_clear_winner(tmp_path: Path) -> None:
    """Synthetic evaluations (arc_easy, 4 answers, 600 questions): teacher 80%, CE baseline 40%, variant `b`
    70%, reference `a` 45%. The metric counts, b's mean retained gain is about 0.75 against 0.125, and its lead
    over the reference excludes zero; the table and ab.md say so."""
    import math
    from types import SimpleNamespace

    from eval import per_example
    from pipelines.ab import Variant, compare, to_markdown

    rng = np.random.default_rng(1)
    n = 600
    ids = list(range(n))

    def model(name: str, p: float) -> dict:
        values = (rng.random(n) < p).astype(float)
        folder = tmp_path / name
        per_example.write(folder, {"arc_easy": {"task": "arc_easy", "doc_ids": ids,
                                                "metrics": {"acc": {"aggregation": "mean",
                                                                    "values": values.tolist()}}}})
        mean = float(values.mean())
        metrics = {"arc_easy/acc": {"value": mean, "stderr": math.sqrt(mean * (1 - mean) / n),
                                    "higher_is_better": True}}
        return {"outputs": {"metrics": metrics, "per_example": str(folder)}}

    records = {"eval_teacher": model("teacher", 0.8), "eval_baseline": model("baseline", 0.4)}
    ctx = SimpleNamespace(records=records, output=lambda stage, key: records[stage]["outputs"][key])
    variants = [Variant("a", {}, ""), Variant("b", {"on_policy_rate": 0.25}, "distill.on_policy_rate=0.25")]
    runs = {"a": {"eval_student": model("a", 0.45), "distill": {"outputs": {"tokens": 1000}}},
            "b": {"eval_student": model("b", 0.7), "distill": {"outputs": {"tokens": 800}}}}
    table = compare(ctx, variants, runs)
    assert table["counted_metrics"] == ["arc_easy/acc"]
    a, b = table["variants"]["a"], table["variants"]["b"]
    assert 0.0 < a["retained_gain_mean"] < 0.35 and 0.6 < b["retained_gain_mean"] < 0.9
    lead = b["minus_reference"]["retained_gain_mean"]
    assert lead["estimate"] == pytest.approx(b["retained_gain_mean"] - a["retained_gain_mean"])
    assert lead["excludes_zero"] and b["minus_reference"]["metrics"]["arc_easy/acc"]["excludes_zero"]
    assert table["winner"] == {"variant": "b", "retained_gain_mean": b["retained_gain_mean"],
                               "lead_over_reference": lead, "clear": True}
    # Against the CE baseline: b is 30 points above it, a 5 (noise at 600 questions).
    assert b["minus_baseline"]["arc_easy/acc"]["estimate"] == pytest.approx(0.3, abs=0.06)
    assert b["minus_baseline"]["arc_easy/acc"]["excludes_zero"]
    assert a["minus_baseline"]["arc_easy/acc"]["low"] < a["minus_baseline"]["arc_easy/acc"]["estimate"]
    md = to_markdown(table, "synthetic")
    assert "## Per metric: variant minus CE baseline" in md
    assert "Highest mean retained gain: **b**" in md and "excludes zero" in md and "| arc_easy/acc (higher is better) |" in md


def test_a_time_limit_stops_cleanly_with_exit_75(tiny_moe_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """TIME_LIMIT: `make ab` in several calls, as on a machine lent for a few minutes at a time."""
    from core import deadline
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    assert deadline.ENV not in os.environ
    try:
        code = main(["ab", "--preset", "ci", "--teacher", str(tiny_moe_dir), "--runs-dir", str(tmp_path / "runs"),
                     "--time-limit", "0.001", "--variant", "a", "", "--variant", "b", "distill.lr=1e-4"])
    finally:  # the limit is the process's (an environment variable): it must not reach the tests after this one
        os.environ.pop(deadline.ENV, None)
    assert code == deadline.EXIT_CODE == 75
    assert "run the same command again to continue" in capsys.readouterr().err


def test_a_failing_variant_is_named_and_the_others_still_run() -> None:
    """One broken recipe costs its own stages, not the comparison; a time limit still stops everything."""
    from core.deadline import TimeLimitReached
    from pipelines.ab import Variant, run_variants, to_markdown

    ran: list[str] = []

    def run_one(v: Variant) -> dict:
        ran.append(v.name)
        if v.name == "bad":
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
        return {"eval_student": v.name}

    variants = [Variant(n, {}, "") for n in ("a", "bad", "c")]
    records, failed = run_variants(variants, run_one)
    assert ran == ["a", "bad", "c"] and set(records) == {"a", "c"}
    assert failed == {"bad": "RuntimeError: CUDA error: an illegal memory access"}
    md = to_markdown({"reference": "a", "counted_metrics": [], "rule": "r", "variants": {}, "failed": failed}, "x")
    assert "| bad | failed: RuntimeError: CUDA error: an illegal memory access |" in md

    with pytest.raises(RuntimeError, match="illegal memory"):  # nothing finished: the first error itself
        run_variants([Variant("bad", {}, "")], run_one)

    def out_of_time(v: Variant) -> dict:
        raise TimeLimitReached("no time left")

    with pytest.raises(TimeLimitReached):
        run_variants(variants, out_of_time)
