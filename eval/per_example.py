"""Per-example scores of one evaluation: lm-eval's logged samples cut down to doc id -> metric value, one compact
JSON file per task, so the report can pair the same examples across teacher, student and baseline.

File `<folder>/<task>.json` (task without the `local_` prefix):
    {"task": "arc_easy", "doc_ids": [0, 1, ...],
     "metrics": {"acc": {"aggregation": "mean", "values": [1.0, 0.0, ...]},
                 "bits_per_byte": {"aggregation": "bits_per_byte", "values": [ll, ...], "counts": [bytes, ...]}}}
`values[i]` belongs to `doc_ids[i]`. For accuracies a value is the example's 0/1 score; for the perplexities and
bits per byte (a pair per example in lm-eval) `values` is the log-likelihood in nats and `counts` the words or
bytes of the document, so bits per byte of a document = -value / (count * ln 2), and of a set of documents the
ratio of the sums. A metric is named as in eval.lm_eval_runner.flatten_metrics (`acc`, or `acc_<filter>`).
Prompts, documents and responses are not kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eval.bootstrap import AGGREGATIONS, RATIO_AGGREGATIONS, Scores

TASK_PREFIX = "local_"
# Fields of a logged sample that are not metrics (lm-eval 0.4.13, evaluator.evaluate).
_SAMPLE_FIELDS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                  "doc_hash", "prompt_hash", "target_hash"}


def _number(x: Any) -> float | None:
    if isinstance(x, (bool, int, float, np.integer, np.floating, np.bool_)):
        return float(x)
    return None


def from_samples(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """lm-eval's `results["samples"]` ({task: [logged sample, ...]}) as {task (no prefix): per-example record}
    in the file format above. A metric whose per-example value is neither a number nor a pair of numbers is
    left out (it cannot be resampled here)."""
    out: dict[str, dict[str, Any]] = {}
    for task, rows in samples.items():
        short = task.removeprefix(TASK_PREFIX)
        by_metric: dict[str, dict[int, Any]] = {}
        base: dict[str, str] = {}  # metric name -> lm-eval's metric, for its aggregation
        for row in rows:
            filt = row.get("filter", "none")
            for metric in row.get("metrics") or [k for k in row if k not in _SAMPLE_FIELDS]:
                name = metric if filt == "none" else f"{metric}_{filt}"
                by_metric.setdefault(name, {})[int(row["doc_id"])] = row[metric]
                base[name] = metric
        doc_ids = sorted({d for values in by_metric.values() for d in values})
        metrics: dict[str, dict[str, Any]] = {}
        for name, values in sorted(by_metric.items()):
            if set(values) != set(doc_ids):
                continue
            agg = AGGREGATIONS.get(base[name], "mean")
            if agg in RATIO_AGGREGATIONS:
                pairs = [values[d] for d in doc_ids]
                if not all(isinstance(p, (list, tuple)) and len(p) == 2 and _number(p[0]) is not None
                           and _number(p[1]) is not None for p in pairs):
                    continue
                metrics[name] = {"aggregation": agg, "values": [float(p[0]) for p in pairs],
                                 "counts": [float(p[1]) for p in pairs]}
            else:
                nums = [_number(values[d]) for d in doc_ids]
                if any(v is None for v in nums):
                    continue
                metrics[name] = {"aggregation": agg, "values": nums}
        out[short] = {"task": short, "doc_ids": doc_ids, "metrics": metrics}
    return out


def write(folder: Path, records: dict[str, dict[str, Any]]) -> list[Path]:
    """Write one `<task>.json` per record into folder (created); returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, record in sorted(records.items()):
        path = folder / f"{task}.json"
        path.write_text(json.dumps(record, separators=(",", ":")))
        paths.append(path)
    return paths


def read(folder: Path) -> dict[str, tuple[list[int], Scores]]:
    """Every metric of every `<task>.json` in folder as {"task/metric": (doc ids, Scores)}; {} if no folder."""
    out: dict[str, tuple[list[int], Scores]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        ids = [int(d) for d in record["doc_ids"]]
        for name, m in record["metrics"].items():
            counts = np.asarray(m["counts"], dtype=np.float64) if "counts" in m else None
            out[f"{record['task']}/{name}"] = (ids, Scores(np.asarray(m["values"], dtype=np.float64), counts,
                                                           m["aggregation"]))
    return out


def paired(per_model: dict[str, tuple[list[int], Scores]]) -> dict[str, Scores]:
    """The models' Scores cut to the doc ids all of them have, in one order, so they pair example by example.

    per_model: {model role: (doc ids, Scores)}. Returns {role: Scores} over the common ids (sorted)."""
    common = sorted(set.intersection(*(set(ids) for ids, _ in per_model.values())))
    out = {}
    for role, (ids, s) in per_model.items():
        pos = {d: i for i, d in enumerate(ids)}
        take = np.asarray([pos[d] for d in common], dtype=np.int64)
        out[role] = Scores(s.values[take], None if s.counts is None else s.counts[take], s.aggregation)
    return out
