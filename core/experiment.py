"""The MLflow experiment every run of this project logs to: `$MLFLOW_EXPERIMENT_NAME`, as MLflow's own clients
read it, else `distill`. One home, read by the pipeline that writes runs and by the tools that compare them."""
from __future__ import annotations

import os

DEFAULT_EXPERIMENT = "distill"


def experiment_name() -> str:
    """`$MLFLOW_EXPERIMENT_NAME` if set and not blank, else `distill`."""
    return (os.environ.get("MLFLOW_EXPERIMENT_NAME") or "").strip() or DEFAULT_EXPERIMENT
