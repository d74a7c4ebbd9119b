"""An empty MLflow store per test, copied from one made once per session.

A new SQLite store runs MLflow's schema migrations on first use (about 2 s on the 2-core CI machine, in every
process that opens it first); the tests that run the pipeline each need their own store, so they copy a
migrated empty one instead. What the pipeline does with the store (its experiment, its artifact folder beside
the database) is unchanged: the template holds only MLflow's tables and its default experiment.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

_TEMPLATE: list[Path] = []


def fresh_store(folder: Path) -> str:
    """sqlite URI of a new, empty MLflow store at folder/mlflow.db (folder is created)."""
    if not _TEMPLATE:
        from mlflow.tracking import MlflowClient

        db = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{db}").search_experiments()  # creates and migrates the tables
        _TEMPLATE.append(db)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "mlflow.db"
    shutil.copyfile(_TEMPLATE[0], target)
    return f"sqlite:///{target}"
