"""The distilled student in MLflow's Model Registry: one registered model per run folder, one version per
distinct student, tagged with its evaluation numbers and linked to the runs that made it.

A rerun that reuses the distill stage finds the version it registered before (same source model) and only
refreshes its tags, so the registry holds one version per student actually trained, not one per invocation.
"""
from __future__ import annotations

import math
from typing import Any

REGISTERED_PREFIX = "moe-distill-"


def registered_name(run_name: str) -> str:
    """The registered model of a run folder: `moe-distill-<run name>` (run names are already safe names)."""
    return f"{REGISTERED_PREFIX}{run_name}"


def _tags(records: dict[str, dict], summary: dict[str, Any], parent_run_id: str) -> dict[str, str]:
    """Version tags: the student's evaluation metrics, the summary numbers and the producing runs."""
    tags = {"pipeline_run_id": parent_run_id,
            "distill_run_id": records["distill"].get("mlflow_run_id", ""),
            "eval_run_id": records.get("eval_student", {}).get("mlflow_run_id", "")}
    for key, row in (records.get("eval_student", {}).get("outputs", {}).get("metrics") or {}).items():
        value = row.get("value") if isinstance(row, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            tags[f"eval/{key}"] = f"{value:.6g}"
    for key in ("retained_mean", "retained_gain_mean", "speedup"):
        value = summary.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            tags[f"summary/{key}"] = f"{value:.6g}"
    return tags


def register_student(run_name: str, records: dict[str, dict], summary: dict[str, Any],
                     parent_run_id: str) -> tuple[str, str] | None:
    """Register (or find) the version of the distilled student logged by the distill stage; returns
    (registered name, version), or None when the distill stage logged no model (multi-process runs log none
    from other ranks; the record says so)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = records.get("distill", {}).get("outputs", {}).get("model_uri")
    if not uri:
        return None
    client = MlflowClient()
    name = registered_name(run_name)
    existing = [v for v in client.search_model_versions(f"name='{name}'")
                if v.source == uri or getattr(v, "model_id", None) == uri.rsplit("/", 1)[-1]]
    version = existing[0] if existing else mlflow.register_model(uri, name)
    for key, value in _tags(records, summary, parent_run_id).items():
        client.set_model_version_tag(name, version.version, key, value)
    if not existing:
        client.update_model_version(
            name, version.version,
            description=f"Distilled by pipeline run {parent_run_id} (distill stage run "
                        f"{records['distill'].get('mlflow_run_id', '')}); evaluation numbers in the tags.")
    return name, str(version.version)
