"""Compare every pipeline run in the MLflow experiment (`$MLFLOW_EXPERIMENT_NAME`, else `distill`): a quality-vs-speedup Pareto plot and a table.

    MLFLOW_TRACKING_URI=sqlite:///.../mlflow.db python -m eval.compare --out DIR

A pipeline run is a top-level run (no `mlflow.parentRunId` tag) tagged `stage=pipeline`; its report.json
artifact (the content eval/report.py renders) holds everything we plot, so the comparison never needs the
child runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from core.experiment import experiment_name  # noqa: E402
from eval.pareto import pareto_front  # noqa: E402

COLUMNS = ["run", "teacher", "student", "preset", "retained_mean", "speedup", "student params"]


def load_pipeline_reports(experiment: str | None = None, tracking_uri: str | None = None) -> list[dict]:
    """Every parent pipeline run of `experiment` that has a report.json, oldest first.

    Returns [{"run_id", "run_name", "report": dict}]. Runs without the artifact are skipped with a warning
    (a pipeline that crashed before writing it)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = experiment or experiment_name()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)
    out = []
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            continue  # a nested stage run that happens to carry the tag
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report.json",
                                                            dst_path=tmp, tracking_uri=tracking_uri)
                report = json.loads(Path(local).read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - missing artifact raises differently per store
            print(f"warning: run {run.info.run_id} has no readable report.json ({type(exc).__name__})",
                  file=sys.stderr)
            continue
        out.append({"run_id": run.info.run_id, "run_name": run.info.run_name, "report": report})
    return out


def _float(x: object) -> float:
    return float(x) if isinstance(x, (int, float)) else float("nan")


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per run, or per student of a run with several (`run/student`): the COLUMNS plus the numeric
    retained/speedup for plotting."""
    rows = []
    for r in runs:
        rep = r["report"]
        run = r["run_name"] or r["run_id"][:8]
        section = rep.get("students") or {}
        if section.get("rows"):  # a run with several students (eval.students): one point each, run/student
            points = [(f"{run}/{st['name']}", st.get("model", "?"), st.get("retained_mean"), st.get("speedup"),
                       section.get("setting", "?"), st.get("params")) for st in section["rows"]]
        else:
            s, summ = rep.get("student") or {}, rep.get("summary") or {}
            points = [(run, s.get("name", "?"), summ.get("retained_mean"), summ.get("speedup"),
                       summ.get("speedup_setting", "?"), s.get("params_total"))]
        for label, student, retained, speedup, setting, params in points:
            rows.append({"run": label, "run_id": r["run_id"], "teacher": (rep.get("teacher") or {}).get("name", "?"),
                         "student": student, "preset": (rep.get("run") or {}).get("preset", "?"),
                         "retained_mean": _float(retained), "speedup": _float(speedup), "speedup_setting": setting,
                         "student params": params})
    return rows


def _cell(row: dict, col: str) -> str:
    v = row[col]
    if col == "retained_mean":
        return "—" if math.isnan(v) else f"{100 * v:.1f}%"
    if col == "speedup":
        return "—" if math.isnan(v) else f"{v:.2f}× ({row['speedup_setting']})"
    if col == "student params":
        return f"{v / 1e6:.1f}M" if isinstance(v, (int, float)) else "?"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    """Markdown table with COLUMNS, one line per run."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Scatter of retained quality against speedup, one labelled point per run; the Pareto front is
    highlighted and joined by a step line."""
    pts = [(r["speedup"], r["retained_mean"]) for r in rows]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for r, (x, y), on in zip(rows, pts, front):
        if math.isnan(x) or math.isnan(y):
            continue
        ax.scatter([x], [y], s=90 if on else 40, color="#d62728" if on else "#7f7f7f",
                   edgecolors="black" if on else "none", zorder=3)
        label = r["run"] if r["run"] else f"{r['teacher']}→{r['student']}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fx = sorted((p for p, on in zip(pts, front) if on), key=lambda p: p[0])
    if len(fx) > 1:
        ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color="#d62728", alpha=0.5, zorder=2,
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup of student over teacher (×, headline setting)")
    ax.set_ylabel("mean retained quality (student / teacher)")
    ax.set_title(f"Distillation runs: quality vs speed ({len(rows)} runs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(out_dir: Path, experiment: str | None = None, tracking_uri: str | None = None) -> dict[str, Path] | None:
    """Write out_dir/pareto.png and out_dir/compare.md, print the table. None when there is no run."""
    experiment = experiment or experiment_name()
    runs = load_pipeline_reports(experiment, tracking_uri)
    if not runs:
        uri = tracking_uri or mlflow.get_tracking_uri()
        print(f"no pipeline runs (stage=pipeline, with report.json) in MLflow experiment '{experiment}' "
              f"at {uri}: run the pipeline first, or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return None
    rows = summary_rows(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / "pareto.png", out_dir / "compare.md"
    plot_pareto(rows, png)
    table = markdown_table(rows)
    on_front = [r["run"] for r, on in zip(rows, pareto_front([(r["speedup"], r["retained_mean"]) for r in rows]))
                if on]
    md.write_text(f"# Distillation runs in `{experiment}`\n\n{table}\n\nPareto front: {', '.join(on_front) or '—'}"
                  f"\n\n![pareto](pareto.png)\n", encoding="utf-8")
    print(table)
    return {"png": png, "md": md}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for pareto.png and compare.md")
    ap.add_argument("--experiment", default=None, help="default: $MLFLOW_EXPERIMENT_NAME or distill")
    args = ap.parse_args(argv)
    # One progress bar per downloaded report.json only buries the table on the terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The tracking URI comes from MLFLOW_TRACKING_URI, which MlflowClient reads when given None. MLflow's
    # fallback is a SQLite file in the working directory, which is rarely the store that holds the runs.
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        print(f"note: MLFLOW_TRACKING_URI is not set; using MLflow's default {mlflow.get_tracking_uri()}",
              file=sys.stderr)
    return 0 if compare(args.out, args.experiment) else 1


if __name__ == "__main__":
    sys.exit(main())
