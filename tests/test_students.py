"""Several students in one run (`students:`): what may differ, the per-student stages, the section comparing them,
its plot, `make compare`, and the whole thing on the ci preset end to end (shared stages run once, a rerun reuses
everything, --plan names each student's stages)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.errors import ConfigError
from tests.mlflow_store import fresh_store


@pytest.mark.parametrize("overrides, message", [
    ("students.main.student_options.keep_layers=top_2", "not 'main'"),
    ("students.a/b.student_options.keep_layers=top_2", "one folder under students/"),
    ("students.x.distill.lr=1e-4", "only student and student_options.* may differ"),
    ("students.x.student_options.nope=1", "students.x: unknown config key 'student_options.nope'"),
    ("students.x.student_options.method=best", "students.x: student_options.method"),
    ("students.x.student_options.keep_layers=top_3 students.y.student_options.keep_layers=top_3",
     "students.y is the same student as students.x"),
    ("students.x.student_options.keep_layers=top_2", "same student as the main student"),
    ("students=3", "'students' is a mapping"),
])
def test_a_student_that_cannot_be_compared_is_refused_when_the_config_loads(overrides: str, message: str) -> None:
    from pipelines.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config("ci", overrides)


def test_set_adds_to_the_presets_students_and_an_empty_mapping_clears_them(tmp_path: Path) -> None:
    from pipelines.config import load_config, student_variants

    preset = tmp_path / "two.yaml"
    preset.write_text("base: ci\nstudents:\n  wide:\n    student_options: {keep_layers: top_3}\n")
    cfg = load_config(str(preset), "students.narrow.student_options.keep_layers=top_1")
    variants = dict(student_variants(cfg))
    assert list(variants) == ["wide", "narrow"]
    assert variants["wide"].student_options.keep_layers == "top_3" and variants["wide"].students == {}
    assert variants["narrow"].distill == cfg.distill and variants["narrow"].data == cfg.data
    assert load_config(str(preset), "students={}").students == {}


def test_each_extra_student_runs_every_stage_that_reads_the_student() -> None:
    from pipelines.config import load_config
    from pipelines.student_set import per_student_stages

    names = [s.name for s in per_student_stages(load_config("ci"))]
    assert names == ["student", "distill", "baseline", "eval_student_init", "eval_student", "eval_baseline",
                     "latency", "report"]
    # without a baseline its stages are not run for any student
    assert "baseline" not in [s.name for s in per_student_stages(load_config("ci", "baseline.enabled=false"))]


def _row(name: str, params: int, retained: float, speedup: float, gain: float = 0.3) -> dict:
    return {"name": name, "model": f"derived({name})", "params": params, "retained_mean": retained,
            "retained_stderr": 0.01, "baseline_retained_mean": retained - 0.05, "retained_gain_mean": gain,
            "retained_gain_mean_ci": {"estimate": gain, "low": gain - 0.1, "high": gain + 0.1}, "counted": 3,
            "speedups": {"decode_b1": speedup, "decode_b32": speedup * 0.8}, "speedup": speedup}


def test_the_section_marks_the_front_and_the_largest_student_at_two_times() -> None:
    from eval.students import students_section

    section = students_section([_row("main", 80, 0.90, 3.0), _row("wide", 110, 0.95, 2.1),
                                _row("slow", 120, 0.97, 1.5), _row("bad", 60, 0.85, 2.5)])
    assert [r["pareto"] for r in section["rows"]] == [True, True, True, False]  # bad: beaten by main on both
    assert section["largest_at_target"] == "wide"  # slow is larger but below 2x
    assert students_section([_row("a", 1, 0.9, 1.5)])["largest_at_target"] is None


def test_the_front_uses_each_model_at_its_faster_decode_path_when_every_student_has_it() -> None:
    from eval.students import students_section

    # decode_best_b1 (each model on its faster of generate and the compiled static cache) where all have it
    a, b = _row("a", 80, 0.90, 1.5), _row("b", 110, 0.95, 1.8)
    a["speedups"]["decode_best_b1"], b["speedups"]["decode_best_b1"] = 2.4, 2.1
    section = students_section([a, b])
    assert section["setting"] == "decode_best_b1" and [r["speedup"] for r in section["rows"]] == [2.4, 2.1]
    assert section["largest_at_target"] == "b"
    # one student without it (its compile failed, say): all are placed on plain generate, alike
    del b["speedups"]["decode_best_b1"]
    section = students_section([a, b])
    assert section["setting"] == "decode_b1" and [r["speedup"] for r in section["rows"]] == [1.5, 1.8]
    assert section["largest_at_target"] is None


def test_student_row_reads_a_report() -> None:
    from eval.students import student_row

    report = {"student": {"name": "derived(x)", "params_total": 123},
              "summary": {"retained_mean": 0.8, "retained_gain_mean": 0.25, "speedup": 2.0,
                          "retained_gain_mean_ci": {"estimate": 0.25, "low": 0.1, "high": 0.4},
                          "headline": {"counted": 2}},
              "quality": {"arc_easy/acc": {"teacher": 0.8, "student": 0.6, "baseline": 0.5, "higher_is_better": True,
                                           "stderr": {"student": 0.02}, "headline": {"counted": True}}},
              "latency": {"decode_b1": {"speedup": 2.0}, "decode_b32": {"speedup": 1.5},
                          "memory_weights": {"speedup": 3.0}, "decode_static_b1": {"speedup": None}}}
    row = student_row("s", report)
    assert row["speedups"] == {"decode_b1": 2.0, "decode_b32": 1.5} and row["speedup"] == 2.0
    assert row["baseline_retained_mean"] == pytest.approx(0.5 / 0.8) and row["counted"] == 2
    assert row["retained_stderr"] == pytest.approx(0.02 / 0.8)
    assert student_row("s", {**report, "latency": {}})["speedup"] != student_row("s", report)["speedup"]  # NaN


def test_the_report_shows_every_student_with_its_plot(tmp_path: Path) -> None:
    from eval.report import write_report
    from eval.students import students_section

    report = {"run": {"name": "r"}, "students": students_section([_row("main", 80_000_000, 0.9, 3.0),
                                                                  _row("wide", 110_000_000, 0.95, 2.1, gain=-0.2)])}
    files = write_report(report, tmp_path)
    assert files["students"].read_bytes().startswith(b"\x89PNG")
    md = files["md"].read_text()
    assert "## Students" in md and "| wide (front) | derived(wide) | 110M | 95.0% |" in md
    assert "30.0% [20.0%, 40.0%] *" in md and "-20.0% [-30.0%, -10.0%] *" in md
    assert "speedup decode_b32" in md and "largest student at least 2.00× faster at `decode_b1`: **wide**" in md


def test_compare_draws_one_point_per_student() -> None:
    from eval.compare import summary_rows
    from eval.students import students_section

    report = {"run": {"preset": "h100"}, "teacher": {"name": "t"}, "student": {"name": "main-model"},
              "summary": {"retained_mean": 0.9, "speedup": 3.0},
              "students": students_section([_row("main", 80, 0.9, 3.0), _row("wide", 110, 0.95, 2.1)])}
    rows = summary_rows([{"run_id": "abc", "run_name": "flag", "report": report},
                         {"run_id": "def", "run_name": "single", "report": {**report, "students": None}}])
    assert [r["run"] for r in rows] == ["flag/main", "flag/wide", "single"]
    assert rows[1]["speedup"] == 2.1 and rows[1]["student params"] == 110 and rows[2]["speedup"] == 3.0


@pytest.mark.slow
def test_two_students_in_one_run_on_the_ci_preset(tiny_moe_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from kernels import kd_loss
    from pipelines.run import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)
    runs = tmp_path / "runs"
    args = ["--preset", "ci", "--teacher", str(tiny_moe_dir), "--run-name", "two", "--runs-dir", str(runs),
            "--set", "students.wide.student_options.keep_layers=top_3 teacher_tune.steps=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = runs / "two"
    wide = run_dir / "students" / "wide"
    # the shared stages ran once, in the run folder; the wide student has only its own
    assert sorted(p.name for p in wide.iterdir() if p.is_dir()) == [
        "baseline", "distill", "eval_baseline", "eval_student", "eval_student_init", "latency", "report", "student"]
    assert out.count("[logits] running") == 1 and out.count("[eval_teacher] running") == 1
    assert out.count("[latency_teacher] running") == 1 and out.count("[latency] running") == 2  # teacher timed once
    report = json.loads((run_dir / "report.json").read_text())
    rows = {r["name"]: r for r in report["students"]["rows"]}
    assert set(rows) == {"main", "wide"}
    assert rows["wide"]["params"] > rows["main"]["params"]  # 3 of 4 layers against 2
    assert rows["wide"]["model"].endswith("layers=top_3)") and rows["main"]["model"].endswith("layers=top_2)")
    for r in rows.values():
        assert r["speedup"] > 0 and math.isfinite(r["speedup"]) and "decode_b1" in r["speedups"]
    wide_report = json.loads((wide / "report" / "report.json").read_text())
    assert wide_report["student"]["params_total"] == rows["wide"]["params"]
    assert wide_report["quality"]["arc_easy/acc"]["teacher"] == report["quality"]["arc_easy/acc"]["teacher"]
    assert (run_dir / "students.png").is_file() and "## Students" in (run_dir / "report.md").read_text()
    assert "students (speedup at decode_b1):" in out and "  wide " in out
    # A rerun reuses every stage of both students; --plan says so per student first.
    assert main(args + ["--plan"]) == 0
    planned = capsys.readouterr().out
    assert f"student wide: {wide}" in planned and "run:" not in planned
    assert main(args) == 0
    assert "running (inputs" not in capsys.readouterr().out


def test_a_missing_extra_student_is_named_before_any_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from pipelines.run import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    runs = tmp_path / "runs"
    assert main(["--preset", "ci", "--run-name", "bad", "--runs-dir", str(runs),
                 "--set", f"students.x.student={tmp_path / 'nope'}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error (model): students.x: student ") and "does not exist" in err[-1]
    assert [p.name for p in (runs / "bad").iterdir()] in ([], [".lock"])  # no stage output


def test_an_error_in_an_extra_students_stage_names_the_student(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting that only fails when the student is built (keep_layers beyond the teacher's depth) is the usual
    one-line error, saying which student's settings to fix; the stages before it stay done."""
    from types import SimpleNamespace

    import torch

    from pipelines import student_set
    from pipelines.config import load_config

    def run_stage(stage, ctx, tags):
        raise ConfigError("student_options.keep_layers does not fit this 4-layer teacher")
    monkeypatch.setattr(student_set, "run_stage", run_stage)
    cfg = load_config("ci", "students.deep.student_options.keep_layers=top_9")
    ctx = SimpleNamespace(run_dir=tmp_path, device=torch.device("cpu"), records={})
    with pytest.raises(ConfigError) as err:
        student_set.run_students(cfg, ctx, {})
    assert err.value.describe().startswith("error (config): students.deep: student_options.keep_layers does not")
    assert "set it as students.deep.<key>" in str(err.value)
