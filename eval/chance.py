"""Chance level of a benchmark metric: the accuracy of guessing uniformly among a multiple-choice task's answers.

The number of answers of each multiple-choice task in eval/tasks/*.yaml (`output_type: multiple_choice`): the
length of its `doc_to_choice` where that is a list (`["A", "B", "C", "D"]`, `"{{[sol1, sol2]}}"`), else the
count in the benchmark's data (ARC, OpenBookQA, HellaSwag: 4 answers; WinoGrande: 2). The table is written
out here rather than read from the YAML files at run time, so that the report stage's code identity does not
take in the task files (an edit to one reruns the evaluations, and the report through them, already);
tests/test_report.py reads every task file and fails when this table and the files disagree.

Only accuracies of multiple-choice tasks have a chance level; perplexities, bits per byte and LAMBADA's
exact-word accuracy (not a choice among given answers) have none.
"""

from __future__ import annotations

# Task name (without the `local_` prefix) -> number of answers. ARC has a few questions with 3 or 5 answers;
# 4 is the count of almost all of them.
TASK_CHOICES = {"arc_challenge": 4, "arc_easy": 4, "boolq": 2, "hellaswag": 4, "mmlu": 4, "openbookqa": 4,
                "piqa": 2, "sciq": 4, "winogrande": 2}

# The accuracies a chance level applies to.
CHOICE_METRICS = frozenset({"acc", "acc_norm"})


def chance_level(metric_key: str) -> float | None:
    """Chance accuracy of a report metric key 'task/metric' (1 / number of answers), or None where the metric
    has no chance level (not an accuracy of a multiple-choice task, or a task not in TASK_CHOICES)."""
    task, _, metric = metric_key.rpartition("/")
    if metric not in CHOICE_METRICS:
        return None
    n = TASK_CHOICES.get(task)
    return 1.0 / n if n else None
