"""`make distill`: teacher -> data -> logits -> student -> distill -> eval -> latency -> report.

Each stage runs only if its inputs changed (its config entries, its code's identity, its upstream outputs:
`pipelines.stage_runner`), inside a nested MLflow run of one parent run per invocation. A killed run is simply
rerun: finished stages are reused, and the two long ones (logits, distill) resume from their last shard or
checkpoint. `--plan` says which stages a run would redo, and why, without running anything.

Every error the user can fix is a `core.errors.UserError`: it is printed as one line,
`error (<kind>): <what and how to fix it>`, with exit code 3 (2 when the run could not start).

    python -m pipelines.run --teacher smollm2-moe --student derived --preset default --set "eval.limit=20"
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from core.errors import UserError  # noqa: E402
from pipelines.config import PipelineConfig, load_config  # noqa: E402
from pipelines.paths import RUNS_DIR  # noqa: E402


def slug(text: str) -> str:
    base = Path(text).name if Path(text).exists() else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-")[:40] or "model"


def run_name(cfg: PipelineConfig) -> str:
    return cfg.run_name or f"{slug(cfg.teacher)}--{slug(cfg.student)}--{cfg.preset}"


def publish_report(ctx: Any, mlflow_info: dict[str, str]) -> Path:
    """Copy the report to the run folder with this invocation's MLflow ids, and log it to the parent run."""
    import mlflow

    from eval.report import write_report

    report = json.loads(Path(ctx.output("report", "report_json")).read_text())
    report["mlflow"] = mlflow_info
    path = ctx.run_dir / "report.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    files = write_report(report, ctx.run_dir)
    for f in [path, *files.values()]:
        mlflow.log_artifact(str(f))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="")
    ap.add_argument("--student", default="")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", default="", help='space-separated key=value overrides, e.g. "distill.lr=1e-4"')
    ap.add_argument("--run-name", default="")
    ap.add_argument("--runs-dir", default=str(RUNS_DIR))
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="seconds this invocation may take: it stops cleanly before (exit 75) and a rerun resumes")
    ap.add_argument("--plan", action="store_true",
                    help="say which stages would run and which would be reused (and why), then stop")
    args = ap.parse_args(argv)
    from core.deadline import set_time_limit

    set_time_limit(args.time_limit)
    try:
        cfg = load_config(args.preset, args.set, teacher=args.teacher, student=args.student,
                          run_name=args.run_name)
    except UserError as e:
        print(e.describe(), file=sys.stderr)
        return e.exit_code
    if args.plan:
        return print_plan(cfg, Path(args.runs_dir))
    return run_pipeline(cfg, Path(args.runs_dir))


def print_plan(cfg: PipelineConfig, runs_dir: Path) -> int:
    """`--plan`: one line per stage, reuse or run and why (the device type as `device=` would resolve it)."""
    import torch

    from pipelines.stage_runner import plan

    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    run_dir = runs_dir / run_name(cfg)
    print(f"run folder: {run_dir}")
    for stage, what in plan(cfg, run_dir, device).items():
        print(f"  {stage:<18} {what}")
    return 0


def run_pipeline(cfg: PipelineConfig, runs_dir: Path) -> int:
    """Run every stage; under `accelerate launch` every process calls this, and rank 0 leads (see
    `core.distributed`). Returns the exit code: 0 done, 2 cannot start, 3 an input or resource error."""
    from core import distributed as dist

    try:
        device = dist.setup(cfg.device)
    except ValueError as e:
        print(f"error (device): {e}", file=sys.stderr)
        return 2
    try:
        return _lead(cfg, runs_dir, device) if dist.is_main() else _follow(cfg, runs_dir, device)
    finally:
        # The launcher stops every process as soon as one exits with an error: wait until rank 0 has said why.
        dist.barrier()
        dist.teardown()


def _lead(cfg: PipelineConfig, runs_dir: Path, device: Any) -> int:
    from core import distributed as dist
    from pipelines.context import RunContext
    from pipelines.tracking import TrackingError, git_commit, setup_tracking

    run_dir = runs_dir / run_name(cfg)
    problem, exp_id = None, ""
    try:
        exp_id = setup_tracking()
    except TrackingError as e:
        problem = e.describe()
    if problem is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "w")  # held until this process exits
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = (f"error (busy): another `make distill` is running in {run_dir}; wait for it or pass "
                       "RUN=<other name>")
    dist.share(problem)  # the other ranks stop too
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device)
    tags = {"teacher": cfg.teacher, "student": cfg.student, "preset": cfg.preset, "git_commit": git_commit(),
            "processes": str(dist.world_size())}
    t0 = time.perf_counter()
    from core.deadline import EXIT_CODE, TimeLimitReached

    try:
        report, summary, info = _run_stages(cfg, ctx, tags, exp_id, t0)
    except TimeLimitReached as e:
        print(f"\nstopped for the time limit: {e}. Finished stages and checkpoints are kept: run the same command "
              f"again to continue (exit code {EXIT_CODE}).", file=sys.stderr)
        return EXIT_CODE
    except UserError as e:
        # Input or resource problems the user fixes: the message says how; the traceback would bury it.
        # Finished stages and partial work (shards, checkpoints) stay; the same command resumes.
        print(f"\n{e.describe()}", file=sys.stderr)
        return e.exit_code
    print(f"\nreport: {report.with_suffix('.md')}\n"
          f"retained quality (mean over tasks): {summary['retained_mean']:.3f}; "
          f"speedup ({summary['speedup_setting']}): {summary['speedup']:.2f}x\n"
          f"MLflow: experiment {exp_id}, run {info['parent_run_id']} ({info['tracking_uri']}); `make ui` to browse\n"
          f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _follow(cfg: PipelineConfig, runs_dir: Path, device: Any) -> int:
    """Ranks other than 0: no MLflow, no report; their share of the distributed stages only."""
    from core import distributed as dist
    from core.deadline import EXIT_CODE, TimeLimitReached
    from pipelines.context import RunContext
    from pipelines.stage_runner import active_stages, follow_stage

    if dist.share() is not None:
        return 2  # rank 0 could not start and says why
    ctx = RunContext(cfg=cfg, run_dir=runs_dir / run_name(cfg), device=device)
    try:
        for stage in active_stages(cfg):
            ctx.records[stage.name] = follow_stage(stage, ctx)
    except TimeLimitReached:
        return EXIT_CODE  # rank 0 says so
    except dist.RankFailedError:
        return 3  # rank 0 prints the cause
    except UserError as e:
        print(f"\non rank {dist.rank()}: {e.describe()}", file=sys.stderr)
        return e.exit_code
    return 0


def _run_stages(cfg: PipelineConfig, ctx: Any, tags: dict[str, str], exp_id: str,
                t0: float) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """Every stage in order under one parent MLflow run (marked FAILED if a stage raises)."""
    import mlflow

    from pipelines.stage_runner import active_stages, run_stage, stand_in_records
    from pipelines.tracking import flat_params

    with mlflow.start_run(run_name=ctx.run_dir.name, tags={**tags, "stage": "pipeline"}) as parent:
        mlflow.log_params(flat_params(cfg.to_dict()))
        mlflow.log_dict(cfg.to_dict(), "config.json")
        info = {"experiment_id": exp_id, "parent_run_id": parent.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
        ctx.records["_mlflow"] = info
        stand_in_records(cfg, ctx.records)
        for stage in active_stages(cfg):
            ctx.records[stage.name] = run_stage(stage, ctx, {**tags, "parent": parent.info.run_id})
        report = publish_report(ctx, info)
        summary = ctx.output("report", "summary")
        mlflow.log_metrics({k: v for k, v in {"summary/retained_mean": summary["retained_mean"],
                                              "summary/speedup": summary["speedup"],
                                              "pipeline/seconds": time.perf_counter() - t0}.items()
                            if v == v})
    return report, summary, info


if __name__ == "__main__":
    sys.exit(main())
