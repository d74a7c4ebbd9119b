"""eval/compare.py against a throwaway SQLite MLflow store holding two pipeline runs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from eval.compare import main, pareto_front
from tests.mlflow_store import fresh_store


def _report(name: str, retained: float, speedup: float) -> dict:
    return {
        "run": {"name": name, "preset": "smoke"},
        "teacher": {"name": "tiny-olmoe"},
        "student": {"name": f"student-{name}", "params_total": 135_000_000},
        "summary": {"retained_mean": retained, "speedup": speedup, "speedup_setting": "decode_b1"},
    }


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)  # anything MLflow writes relative to the working directory stays in tmp
    uri = fresh_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    # Artifacts under tmp_path too: the default root is ./mlruns relative to wherever pytest runs.
    exp_id = mlflow.create_experiment("distill", artifact_location=(tmp_path / "artifacts").as_uri())
    # set_experiment, not experiment_id=: nested runs would otherwise land in the default experiment.
    mlflow.set_experiment(experiment_id=exp_id)
    for name, retained, speedup in (("run-a", 0.9, 2.0), ("run-b", 0.8, 3.0)):
        with mlflow.start_run(run_name=name, tags={"stage": "pipeline"}):
            mlflow.log_dict(_report(name, retained, speedup), "report.json")
            # A nested stage run with the same tag must not count as a pipeline run.
            with mlflow.start_run(run_name=f"{name}-child", nested=True, tags={"stage": "pipeline"}):
                mlflow.log_dict(_report(f"{name}-child", 0.1, 0.1), "report.json")
    with mlflow.start_run(run_name="not-a-pipeline", tags={"stage": "eval"}):
        mlflow.log_dict(_report("other", 0.5, 0.5), "report.json")
    children = mlflow.search_runs([exp_id], filter_string="tags.mlflow.parentRunId != ''", output_format="list")
    assert len(children) == 2  # the children are really in `distill`, so the exclusion below is tested
    yield uri
    mlflow.set_tracking_uri(None)


def test_compare_two_runs(store: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert main(["--out", str(out)]) == 0
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| run-")]
    assert len(rows) == 2, printed
    assert rows[0].startswith("| run-a | tiny-olmoe | student-run-a | smoke | 90.0% | 2.00× (decode_b1) | 135.0M |")
    md = (out / "compare.md").read_text()
    assert md.count("\n| run-") == 2 and "child" not in md and "not-a-pipeline" not in md
    assert "Pareto front: run-a, run-b" in md  # neither dominates the other


def test_compare_no_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    assert main(["--out", str(tmp_path / "cmp")]) == 1
    assert "no pipeline runs" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_pareto_front() -> None:
    pts = [(2.0, 0.9), (3.0, 0.8), (1.5, 0.85), (3.0, 0.8), (math.nan, 1.0)]
    # (1.5, 0.85) is beaten by (2.0, 0.9); equal points do not dominate each other; NaN is never on it.
    assert pareto_front(pts) == [True, True, False, True, False]
