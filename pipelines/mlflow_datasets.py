"""What a stage trained or evaluated on, as MLflow datasets (the run's "Inputs" in the UI): the training
sequences here, for the training stages; each lm-eval task and the held-out text in `mlflow_eval_sets`.

Each dataset carries a digest of its content, so two runs on the same data show the same dataset, and one on
edited data another. (Two modules, not one: a stage's identity is its import closure, and the training stages
must not depend on the eval task files.)
"""
from __future__ import annotations

import warnings
from pathlib import Path


def dataset_source(path: Path) -> object:
    """The MLflow dataset source of a local file."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # a local path resolves two equal ways; MLflow warns about the tie
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(path))


def log_input(dataset: object, context: str) -> None:
    """`mlflow.log_input`, safe beside a concurrent run on the same store: MLflow inserts a dataset it has not
    seen, so two runs logging the same one at once can both try, and the second fails on the store's unique key
    (sqlite: "UNIQUE constraint failed: datasets..."). The dataset is then there: logging again links it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as e:
            lost_race = "UNIQUE constraint" in str(e) or "IntegrityError" in str(e)
            if not lost_race or attempt == 2:
                raise


def log_training_data(sequences: Path, digest: str) -> None:
    """The token sequences [N, S] a training stage read (the data stage's file), context `training`."""
    import mlflow
    from safetensors.numpy import load_file

    ids = load_file(str(sequences))["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_numpy(ids, source=str(sequences), digest=digest,
                                    name=f"training sequences ({ids.shape[0]} x {ids.shape[1]} tokens)")
    log_input(ds, context="training")
