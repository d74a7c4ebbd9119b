"""pipelines/mlflow_datasets.log_input: two runs on one store logging the same dataset at once."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.mlflow_store import fresh_store


def test_a_dataset_another_run_inserted_first_is_linked_not_fatal(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The race two concurrent runs hit (tests/test_pipeline_kill.py's pair did): MLflow finds no such dataset,
    the other run inserts it, this insert fails on the unique key. Logging again links the dataset."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    from pipelines.mlflow_datasets import dataset_source, log_input

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(fresh_store(tmp_path))
    try:
        _race(mlflow, MetaDataset, MlflowException, dataset_source, log_input, tmp_path, monkeypatch)
    finally:
        mlflow.set_tracking_uri(previous)


def _race(mlflow, MetaDataset, MlflowException, dataset_source, log_input, tmp_path: Path,  # noqa: N803
          monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = mlflow.log_input, []

    def racing(dataset, context):
        calls.append(context)
        if len(calls) == 1:  # what the sqlite store raises when the other run won
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    spec = tmp_path / "task.yaml"
    spec.write_text("task: t\n")
    with mlflow.start_run(experiment_id="0") as run:  # the store's default: whatever experiment is active elsewhere
        log_input(MetaDataset(dataset_source(spec), name="t (4 examples)", digest="abc"), context="evaluation")
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert calls == ["evaluation", "evaluation"] and [d.dataset.name for d in inputs] == ["t (4 examples)"]

    monkeypatch.setattr(mlflow, "log_input", lambda *a, **k: (_ for _ in ()).throw(MlflowException("no such run")))
    with mlflow.start_run(experiment_id="0"), pytest.raises(MlflowException, match="no such run"):
        log_input(MetaDataset(dataset_source(spec), name="u", digest="def"), context="evaluation")
