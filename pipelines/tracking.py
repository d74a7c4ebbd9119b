"""MLflow wiring: one parent run per `make distill`, one nested run per stage.

The store defaults to SQLite in the repo (`mlflow.db`, an absolute URI so it does not depend on the working
directory) with artifacts under `mlartifacts/`; `MLFLOW_TRACKING_URI` overrides both. The store is checked
before any stage starts, so an unreachable server costs seconds, not a finished stage's logging.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from core.errors import UserError
from core.experiment import experiment_name
from pipelines.paths import REPO_ROOT


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be reached or used."""
    kind = "tracking"
    exit_code = 2


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def setup_tracking() -> str:
    """Point MLflow at the store, make sure the experiment (`$MLFLOW_EXPERIMENT_NAME`, else `distill`) exists,
    and return its id."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # Fail in seconds rather than retrying for minutes against a server that is not there.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with _store_init_lock(uri):
            exp_id = _experiment_id(uri)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise TrackingError(f"cannot use the MLflow tracking store at {uri}: {type(e).__name__}: {str(e)[:300]}. "
                            "Start the server or unset MLFLOW_TRACKING_URI to use the local SQLite store.") from e
    return exp_id


@contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Two `make distill` started at once on a new SQLite store would both create its tables (and the
    experiment), and the second fails; one creates them while the other waits on a lock file beside the db."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.with_name(db.name + ".lock")):
        yield


def _experiment_id(uri: str) -> str:
    import mlflow

    name = experiment_name()
    exp = mlflow.get_experiment_by_name(name)  # creates the store's tables on first use
    if exp is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        exp_id = mlflow.create_experiment(name, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def artifact_location(exp_id: str) -> str | None:
    """Where the experiment keeps its artifacts (a URI), or None if the store does not say."""
    import mlflow

    exp = mlflow.get_experiment(exp_id) if exp_id else None
    return exp.artifact_location if exp is not None else None


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} (MLflow params are flat strings of at most 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def safe_metric_name(name: str) -> str:
    """MLflow metric names may not contain ',' (lm-eval's `acc,none`) and a few other characters."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import math

    import mlflow

    clean = {safe_metric_name(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


@contextmanager
def stage_run(name: str, tags: dict[str, str], system_metrics: bool = False) -> Iterator[Any]:
    """A nested MLflow run for one stage; `system_metrics`: MLflow samples CPU, memory (and GPU where
    nvidia-ml-py is installed) while it is open."""
    import logging

    import mlflow

    # Its INFO lines (started, stopped, no GPU found) would interleave with the stage's own progress lines.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    with mlflow.start_run(run_name=name, nested=True, tags={"stage": name, **tags},
                          log_system_metrics=system_metrics) as run:
        yield run
