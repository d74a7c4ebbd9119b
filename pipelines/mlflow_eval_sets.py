"""Each lm-eval task an evaluation stage scored, and the held-out text, as MLflow datasets of the stage's
run (context `evaluation`), recorded by reference: the task definition and its example limit, not a copy."""
from __future__ import annotations

from pathlib import Path

from core.hashing import file_sha256, hash_text
from eval.config import TASKS_DIR
from pipelines.mlflow_datasets import dataset_source, log_input


def log_eval_sets(tasks: list[str], limit: int, heldout: Path | None) -> None:
    """Each lm-eval task scored (by its task file and the example limit) and the held-out text, context
    `evaluation`."""
    from mlflow.data.meta_dataset import MetaDataset

    for task in tasks:
        if task == "local_heldout_text" and heldout is not None:
            log_input(MetaDataset(dataset_source(heldout), name="held-out text", digest=file_sha256(heldout)[:16]),
                      context="evaluation")
            continue
        spec = TASKS_DIR / f"{task}.yaml"
        digest = hash_text(spec.read_text() if spec.is_file() else task, str(limit))
        name = f"{task} ({limit} examples)" if limit else task
        log_input(MetaDataset(dataset_source(spec), name=name, digest=digest), context="evaluation")
