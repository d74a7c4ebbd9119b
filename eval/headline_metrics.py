"""The headline metric of each task: the one score per task that summary plots average over.

A task reports several metrics, some of them the same quantity in another form (held-out text: word
perplexity, byte perplexity and bits per byte are monotone transforms of one log-likelihood), so averaging
every metric would count a task several times. Each task contributes its first metric in `PREFERENCE`
(lm-eval's own primary metrics), else its first metric in name order.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFERENCE = ("acc", "bits_per_byte", "exact_match", "acc_norm", "word_perplexity", "perplexity")


def headline_metrics(keys: Iterable[str]) -> list[str]:
    """From report metric keys 'task/metric', one key per task (sorted by task): its preferred metric."""
    by_task: dict[str, list[str]] = {}
    for key in keys:
        task, _, metric = key.rpartition("/")
        by_task.setdefault(task, []).append(metric)
    out = []
    for task in sorted(by_task):
        metrics = sorted(by_task[task])
        best = next((m for m in PREFERENCE if m in metrics), metrics[0])
        out.append(f"{task}/{best}" if task else best)
    return out
