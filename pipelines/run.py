"""`make distill`: teacher -> data -> logits -> student -> distill -> eval -> latency -> report.

Each stage runs only if its inputs changed (its config entries, its code's identity, its upstream outputs:
`pipelines.stage_runner`), inside a nested MLflow run of one parent run per invocation. A killed run is simply
rerun: finished stages are reused, and the two long ones (logits, distill) resume from their last shard or
checkpoint. `--plan` says which stages a run would redo, and why, without running anything.

Before the first stage, `pipelines.preflight` checks what can be checked without running anything (models,
weights, settings against the models, writable folders). Every error the user can fix is a
`core.errors.UserError`: it is printed as one line, `error (<kind>): <what and how to fix it>`, with exit code 3
(2 when the MLflow store is unreachable or another run holds the folder). Ctrl-C prints one line and exits 130;
the time limit exits 75. `make` turns every failure into 2: `moe-distill run` keeps these codes.

    python -m pipelines.run --teacher smollm2-moe --student derived --preset default --set "eval.limit=20"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from filelock import FileLock, Timeout  # noqa: E402

from core.errors import ConfigError, UserError  # noqa: E402
from core.hashing import hash_text  # noqa: E402
from pipelines.config import PipelineConfig, is_preset_path, load_config, parse_overrides  # noqa: E402
from pipelines.paths import RUNS_DIR  # noqa: E402

INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def slug(text: str) -> str:
    """A model's part of the default run name: readable, one path component. A local path is named by its
    folder plus a short hash of its absolute location, so `a/model` and `b/model` never share a run folder;
    a hub id keeps its owner (`org/name` -> `org-name`)."""
    p = Path(text).expanduser()
    if p.exists():
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.name).strip("-.")[:32] or "model"
        return f"{base}-{hash_text(str(p.resolve()))[:6]}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:40] or "model"


def run_name(cfg: PipelineConfig) -> str:
    """RUN, else `<teacher>--<student>--<preset>`, each one path component (a preset given as a YAML path is
    named by its file, as a model folder is)."""
    preset = slug(cfg.preset) if is_preset_path(cfg.preset) else cfg.preset
    return cfg.run_name or f"{slug(cfg.teacher)}--{slug(cfg.student)}--{preset}"


def _number(x: Any, fmt: str) -> str:
    """A summary number for the closing lines; undefined ones (no task counted, no latency) as 'n/a'."""
    return format(x, fmt) if isinstance(x, (int, float)) and x == x else "n/a (see the report)"


def _speedup(summary: dict[str, Any]) -> str:
    """The headline speedup with its setting, or why there is none (latency switched off or failed)."""
    x = summary.get("speedup")
    if not (isinstance(x, (int, float)) and x == x):
        return "not measured (latency.enabled=false, or see the report)"
    return f"{x:.2f}x ({summary.get('speedup_setting')})"


def run_url(tracking_uri: str, experiment_id: str, run_id: str, port: int = 5000) -> str:
    """Where the run is in the MLflow UI: the tracking server itself, or `make ui`'s local address for a
    local store (with the command that serves it)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:{port}/{page} (serve it with `make ui`)"


def publish_report(ctx: Any, mlflow_info: dict[str, str], extras: dict[str, dict[str, Any]] | None = None) -> Path:
    """Copy the report to the run folder with this invocation's MLflow ids and, with extra students (`extras`:
    {name: their stage records}), the section comparing every student; log it to the parent run."""
    import mlflow

    from core.strict_json import dumps_strict
    from eval.report import NULL_REASONS, write_report
    from pipelines.student_set import students_report

    report = json.loads(Path(ctx.output("report", "report_json")).read_text())
    report["mlflow"] = mlflow_info
    if extras:
        report["students"] = students_report(ctx.records, extras)
    path = ctx.run_dir / "report.json"
    path.write_text(dumps_strict(report, NULL_REASONS))
    files = write_report(report, ctx.run_dir)
    for f in [path, *files.values()]:
        mlflow.log_artifact(str(f))
    return path


def main(argv: list[str] | None = None, prog: str = "make distill") -> int:
    """The entry point: `_main`, with Ctrl-C turned into one line and exit code 130 (finished stages, shards
    and checkpoints are on disk; the same command resumes)."""
    from core import interrupt

    try:
        with interrupt.remembered():
            return _main(argv, prog)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting must not print a trace
        print("\ninterrupted; run the same command to resume", file=sys.stderr, flush=True)
        return INTERRUPTED


def _main(argv: list[str] | None, prog: str) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="")
    ap.add_argument("--student", default="")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", default="", help='space-separated key=value overrides, e.g. "distill.lr=1e-4"')
    ap.add_argument("--data", default="", help="your own text, a file or folder (sets data.files; README: Your own data)")
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
        cfg = load_config(args.preset, with_data(args.set, args.data), teacher=args.teacher,
                          student=args.student, run_name=args.run_name)
    except UserError as e:
        print(e.describe(), file=sys.stderr)
        return e.exit_code
    if args.plan:
        return print_plan(cfg, Path(args.runs_dir))
    return run_pipeline(cfg, Path(args.runs_dir))


def with_data(overrides: str, data: str) -> str | dict[str, Any]:
    """SET text, with DATA as `data.files` (a dict, so a path with spaces or commas stays one path)."""
    if not data:
        return overrides
    parsed = parse_overrides(overrides)
    if "files" in parsed.get("data", {}):
        raise ConfigError('give DATA=<path> or SET="data.files=[...]", not both')
    parsed.setdefault("data", {})["files"] = [data]
    return parsed


def print_plan(cfg: PipelineConfig, runs_dir: Path) -> int:
    """`--plan`: one line per stage, reuse or run and why (the device type as `device=` would resolve it)."""
    import torch

    from pipelines.stage_runner import plan
    from pipelines.student_set import plan_students, student_dir

    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    run_dir = runs_dir / run_name(cfg)
    print(f"run folder: {run_dir}")
    main_plan = plan(cfg, run_dir, device)
    for stage, what in main_plan.items():
        print(f"  {stage:<18} {what}")
    for name, stages in plan_students(cfg, run_dir, device, main_plan).items():
        print(f"student {name}: {student_dir(run_dir, name)}")
        for stage, what in stages.items():
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
    """Rank 0: the whole run, holding the run folder's lock (another run in the same folder is refused)."""
    run_dir = runs_dir / run_name(cfg)
    lock = FileLock(run_dir / ".lock", timeout=0)
    try:
        return _lead_locked(cfg, run_dir, device, lock)
    finally:
        if lock.is_locked:
            lock.release()


def _lead_locked(cfg: PipelineConfig, run_dir: Path, device: Any, lock: FileLock) -> int:
    from core import distributed as dist
    from pipelines.context import RunContext
    from pipelines.preflight import check_writable, local_artifact_dir, preflight
    from pipelines.tracking import artifact_location, git_commit, setup_tracking

    problem, code, exp_id, notes = None, 2, "", []
    try:
        exp_id = setup_tracking()
        check_writable(run_dir, "run folder")
        try:
            lock.acquire()
        except Timeout:
            problem = (f"error (busy): another `make distill` is running in {run_dir}; wait for it or pass "
                       "RUN=<other name>")
        if problem is None:
            notes = preflight(cfg, run_dir, local_artifact_dir(artifact_location(exp_id)))
    except UserError as e:  # before any stage: nothing of this run is written yet but the lock file
        problem, code = e.describe(), e.exit_code
    dist.share(problem)  # the other ranks stop too
    if problem is not None:
        print(problem, file=sys.stderr)
        return code
    for note in notes:
        print(f"note: {note}", flush=True)
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
    registered = f"\nregistered model: {info['registered_model']}" if info.get("registered_model") else ""
    print(f"\nreport: {report.with_suffix('.html')} (and .md, .json)\n"
          f"retained quality (mean over the headline tasks): {_number(summary.get('retained_mean'), '.3f')}; "
          f"speedup: {_speedup(summary)}"
          f"{_students_lines(info['students']) if info.get('students') else ''}\n"
          f"MLflow run: {run_url(info['tracking_uri'], exp_id, info['parent_run_id'])}{registered}\n"
          f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _follow(cfg: PipelineConfig, runs_dir: Path, device: Any) -> int:
    """Ranks other than 0: no MLflow, no report; their share of the distributed stages only."""
    from core import distributed as dist
    from core.deadline import EXIT_CODE, TimeLimitReached
    from pipelines.context import RunContext
    from pipelines.stage_runner import active_stages, follow_stage
    from pipelines.student_set import follow_students

    if dist.share() is not None:
        return 2  # rank 0 could not start and says why
    ctx = RunContext(cfg=cfg, run_dir=runs_dir / run_name(cfg), device=device)
    try:
        for stage in active_stages(cfg):
            ctx.records[stage.name] = follow_stage(stage, ctx)
        follow_students(cfg, ctx)
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

    from pipelines.registry import register_student
    from pipelines.stage_runner import active_stages, run_stage, stand_in_records
    from pipelines.student_set import run_students
    from pipelines.tracking import flat_params

    with mlflow.start_run(run_name=ctx.run_dir.name, tags={**tags, "stage": "pipeline"}) as parent:
        mlflow.log_params(flat_params(cfg.to_dict()))
        mlflow.log_dict(cfg.to_dict(), "config.json")
        info = {"experiment_id": exp_id, "parent_run_id": parent.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
        ctx.records["_mlflow"] = info
        stand_in_records(cfg, ctx.records)
        for stage in active_stages(cfg):
            ctx.records[stage.name] = run_stage(stage, ctx, {**tags, "parent": parent.info.run_id})
        extras = run_students(cfg, ctx, {**tags, "parent": parent.info.run_id})
        report = publish_report(ctx, info, extras)
        summary = ctx.output("report", "summary")
        if extras:
            # A copy: the stages' records hold `info` itself, and their reports are written already.
            info = {**info, "students": json.loads(report.read_text())["students"]}
            _log_students(info["students"])
        registered = register_student(ctx.run_dir.name, ctx.records, summary, parent.info.run_id)
        if registered:
            info["registered_model"] = f"{registered[0]} version {registered[1]}"
        mlflow.log_metrics({k: v for k, v in {"summary/retained_mean": summary["retained_mean"],
                                              "summary/speedup": summary["speedup"],
                                              "pipeline/seconds": time.perf_counter() - t0}.items()
                            if isinstance(v, (int, float)) and v == v})
    return report, summary, info


def _log_students(section: dict[str, Any]) -> None:
    """Each student's headline numbers on the parent run, so the MLflow UI can chart them side by side."""
    import mlflow

    metrics = {}
    for row in section["rows"]:
        for key in ("retained_mean", "retained_gain_mean", "speedup"):
            x = row.get(key)
            if isinstance(x, (int, float)) and x == x:
                metrics[f"students/{row['name']}/{key}"] = x
    mlflow.log_metrics(metrics)


def _students_lines(section: dict[str, Any]) -> str:
    """The closing lines for a run with several students: one per student, the one the 2x question is about
    marked."""
    lines = []
    for row in section["rows"]:
        gain = row.get("retained_gain_mean")
        ci = row.get("retained_gain_mean_ci") or {}
        interval = (f" [{_number(ci.get('low'), '.1%')}, {_number(ci.get('high'), '.1%')}]"
                    if isinstance(ci.get("low"), (int, float)) else "")
        mark = "  <- largest at >= 2x" if row["name"] == section.get("largest_at_target") else ""
        lines.append(f"  {row['name']:<10} retained {_number(row.get('retained_mean'), '.3f')}, gain over its CE "
                     f"baseline {_number(gain, '.1%')}{interval}, speedup {_number(row.get('speedup'), '.2f')}x"
                     f"{' (Pareto front)' if row.get('pareto') else ''}{mark}")
    return "\nstudents (speedup at " + str(section.get("setting")) + "):\n" + "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while Python was still importing, before main() could catch it
        print("\ninterrupted; run the same command to resume", file=sys.stderr)
        sys.exit(INTERRUPTED)
