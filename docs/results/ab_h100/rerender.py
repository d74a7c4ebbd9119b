"""Render ab.md / ab.json again from the committed evaluations of this run, with the current comparison code.

    .venv/bin/python docs/results/ab_h100/rerender.py

The run's own `moe-distill ab` wrote ab.md on the GPU machine; this reads the same per-example scores
(evals/<model>/per_example) and trained-token counts (stages/<variant>_distill.json) from this folder, so the
table can be rendered again when the comparison gains a section, without the 6 GB run folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pipelines.ab import Variant, compare, to_markdown

HERE = Path(__file__).resolve().parent


def _eval(name: str) -> dict:
    return {"outputs": {"metrics": json.loads((HERE / "evals" / name / "metrics.json").read_text()),
                        "per_example": str(HERE / "evals" / name / "per_example")}}


def main() -> None:
    old = json.loads((HERE / "ab.json").read_text())
    shared = {"eval_teacher": _eval("teacher"), "eval_baseline": _eval("baseline")}
    ctx = SimpleNamespace(records=shared, output=lambda stage, key: shared[stage]["outputs"][key])
    variants = [Variant(n, r["settings"], r["source"]) for n, r in old["variants"].items()]
    records = {v.name: {"eval_student": _eval(v.name),
                        "distill": json.loads((HERE / "stages" / f"{v.name}_distill.json").read_text())}
               for v in variants}
    table = compare(ctx, variants, records)
    table["failed"] = old.get("failed", {})
    (HERE / "ab.json").write_text(json.dumps(table, indent=1, default=str))
    (HERE / "ab.md").write_text(to_markdown(table, "ab-h100"))
    print(f"wrote {HERE / 'ab.md'}")


if __name__ == "__main__":
    main()
