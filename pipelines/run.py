"""`make distill`: teacher -> data -> logits -> student -> distill -> eval -> latency -> report.

Each stage runs only if its inputs changed (content hashes, see `stage_cache`), inside a nested MLflow run of
one parent run per invocation. A killed run is simply rerun: finished stages are reused, and the two long
ones (logits, distill) resume from their last shard or checkpoint.

    python -m pipelines.run --teacher smollm2-moe --student derived --preset default --set "eval.limit=20"
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.config import REPO_ROOT, ConfigError, PipelineConfig, load_config  # noqa: E402

StageFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: str  # "module:function" or "module:factory(arg)", imported lazily so `--help` stays fast
    config: tuple[str, ...]  # config sections the output depends on
    code: tuple[str, ...]  # project sources whose change invalidates the output
    upstream: tuple[str, ...]
    uses_device: bool = False
    # Runs on every process of a multi-process launch (each its share of the data); others run on rank 0.
    distributed: bool = False


_EVAL_CODE = ("eval/lm_eval_runner.py", "eval/tasks", "pipelines/stages_eval.py", "teachers/load.py")
STAGES: tuple[Stage, ...] = (
    Stage("teacher", "pipelines.stages_models:teacher_stage", ("teacher", "teacher_options"),
          ("teachers/upcycle.py", "teachers/smollm2_moe.py", "teachers/load.py", "pipelines/stages_models.py"), ()),
    Stage("data", "pipelines.stages_data:data_stage", ("data",),
          ("resources", "pipelines/stages_data.py"), ("teacher",)),
    # From here on "the teacher" is this stage's model: the teacher stage's own when teacher_tune.steps=0.
    Stage("teacher_tune", "pipelines.stages_models:teacher_tune_stage", ("teacher_tune",),
          ("teachers/continued_training.py", "teachers/router_analytics.py", "teachers/load.py",
           "distill/checkpoint.py", "pipelines/stages_models.py"), ("teacher", "data"), uses_device=True),
    Stage("logits", "pipelines.stages_data:logits_stage", ("logits",),
          ("teachers", "pipelines/stages_data.py"), ("teacher_tune", "data"), uses_device=True, distributed=True),
    Stage("student", "pipelines.stages_models:student_stage", ("student", "student_options"),
          ("students", "teachers/load.py", "pipelines/stages_models.py"), ("teacher_tune", "data")),
    Stage("distill", "pipelines.stages_train:distill_stage", ("distill",),
          ("distill", "pipelines/stages_train.py", "teachers/topk_logit_cache.py", "teachers/load.py"),
          ("student", "logits"), uses_device=True, distributed=True),
    Stage("baseline", "pipelines.stages_train:baseline_stage", ("distill", "baseline"),
          ("distill", "pipelines/stages_train.py", "teachers/topk_logit_cache.py", "teachers/load.py"),
          ("student", "logits"), uses_device=True, distributed=True),
    Stage("eval_teacher", "pipelines.stages_eval:make_eval_stage(teacher_tune)", ("eval",), _EVAL_CODE,
          ("teacher_tune", "data"), uses_device=True),
    Stage("eval_student_init", "pipelines.stages_eval:make_eval_stage(student)", ("eval",), _EVAL_CODE,
          ("student", "data"), uses_device=True),
    Stage("eval_student", "pipelines.stages_eval:make_eval_stage(distill)", ("eval",), _EVAL_CODE,
          ("distill", "data"), uses_device=True),
    Stage("eval_baseline", "pipelines.stages_eval:make_eval_stage(baseline)", ("eval",), _EVAL_CODE,
          ("baseline", "data"), uses_device=True),
    Stage("latency", "pipelines.stages_eval:latency_stage", ("latency",),
          ("eval/latency.py", "pipelines/stages_eval.py", "kernels"), ("teacher_tune", "distill"), uses_device=True),
    Stage("report", "pipelines.stages_eval:report_stage", (),
          ("eval/report.py", "pipelines/stages_eval.py"),
          ("teacher", "teacher_tune", "logits", "student", "distill", "eval_teacher", "eval_student_init",
           "eval_student", "latency", "eval_baseline")),
)


def _resolve(spec: str) -> StageFn:
    import importlib

    module, func = spec.split(":")
    m = re.fullmatch(r"(\w+)\((\w+)\)", func)
    mod = importlib.import_module(module)
    return getattr(mod, m.group(1))(m.group(2)) if m else getattr(mod, func)


def slug(text: str) -> str:
    base = Path(text).name if Path(text).exists() else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-")[:40] or "model"


def run_name(cfg: PipelineConfig) -> str:
    return cfg.run_name or f"{slug(cfg.teacher)}--{slug(cfg.student)}--{cfg.preset}"


def input_hash(stage: Stage, cfg: PipelineConfig, records: dict[str, dict], device: str) -> str:
    from pipelines.stage_cache import code_hash, hash_text

    ups = [f"{u}={records[u]['output_hash']}" for u in stage.upstream]
    return hash_text(stage.name, cfg.section_hash(*stage.config) if stage.config else "",
                     code_hash(*stage.code), *ups, device if stage.uses_device else "")


def run_stage(stage: Stage, ctx: Any, parent_tags: dict[str, str]) -> dict[str, Any]:
    """Reuse the stage's output if its inputs are unchanged, else (re)run it; log either way to MLflow.

    Rank 0 of a multi-process launch (see `pipelines.distributed`); the other ranks call `follow_stage`.
    """
    import mlflow

    from pipelines import deadline
    from pipelines import distributed as dist
    from pipelines.stage_cache import is_fresh, read_stage, write_stage
    from pipelines.tracking import flat_params, log_metrics, stage_run

    out = ctx.stage_dir(stage.name)
    h = input_hash(stage, ctx.cfg, ctx.records, ctx.device.type)
    rec = is_fresh(out, h)
    cfg_part = {s: ctx.cfg.to_dict()[s] for s in stage.config}
    # Whether the other ranks are waiting for a hand-off from here: whatever fails while they are (MLflow, a
    # full disk in the bookkeeping) is handed to them as an error instead of leaving them waiting.
    handoff_due = True
    try:
        if rec is None:  # before the stage's MLflow run opens or anything of its folder changes
            deadline.check_stage_start(stage.name)
        with stage_run(stage.name, {**parent_tags, "skipped": str(rec is not None).lower()}) as run:
            mlflow.log_params(flat_params(cfg_part))
            if rec is not None:
                handoff_due = False
                dist.share(("reuse", rec))
                print(f"[{stage.name}] inputs unchanged ({h}); reusing {out}", flush=True)
                mlflow.set_tag("produced_by_run_id", rec.get("mlflow_run_id", ""))
                log_metrics(rec.get("metrics", {}))
                return rec
            old = read_stage(out)
            if old and old.get("input_hash") != h and out.exists():
                # Different inputs: earlier partial work (shards, checkpoints) belongs to another configuration.
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            write_stage(out, {"input_hash": h, "complete": False, "stage": stage.name})
            handoff_due = False
            dist.share(("run", None))
            print(f"[{stage.name}] running (inputs {h})", flush=True)
            t0 = time.perf_counter()
            result, error = _call_stage(stage, ctx, out)
            if stage.distributed:
                dist.check_all(error)  # raises on every rank at once if any rank failed
            handoff_due = True  # the others now wait for the stage's record
            if error is not None:
                raise error
            seconds = time.perf_counter() - t0
            rec = {"stage": stage.name, "input_hash": h, "complete": True, "seconds": seconds,
                   "mlflow_run_id": run.info.run_id, **result}
            rec["metrics"] = {**result.get("metrics", {}), f"{stage.name}/seconds": seconds}
            log_metrics(rec["metrics"])
            mlflow.log_dict(rec, "stage.json")
            write_stage(out, rec)
            handoff_due = False
            dist.share(("done", rec))
            print(f"[{stage.name}] done in {seconds:.1f} s", flush=True)
            return rec
    except BaseException as e:
        if handoff_due:
            dist.share(("error", f"{type(e).__name__}: {e}"))
        raise


def follow_stage(stage: Stage, ctx: Any) -> dict[str, Any]:
    """A rank other than 0: take rank 0's decision for `stage`, do this rank's share of a distributed stage,
    and return the stage's record as rank 0 wrote it."""
    from pipelines import distributed as dist

    kind, rec = dist.share()
    if kind == "error":
        raise _rank0_error(stage, rec)
    if kind == "reuse":
        return rec
    if stage.distributed:
        _, error = _call_stage(stage, ctx, ctx.stage_dir(stage.name))
        dist.check_all(error)
    kind, rec = dist.share()
    if kind == "error":
        raise _rank0_error(stage, rec)
    return rec


def _rank0_error(stage: Stage, message: str) -> Exception:
    from pipelines import distributed as dist
    from pipelines.deadline import TimeLimitReached

    if message.startswith(f"{TimeLimitReached.__name__}:"):  # not a failure: every rank stops and resumes later
        return TimeLimitReached(message)
    return dist.RankFailedError(f"rank 0 failed in stage {stage.name}: {message}")


def _call_stage(stage: Stage, ctx: Any, out: Path) -> tuple[dict[str, Any], BaseException | None]:
    # Caught rather than raised so that every rank reaches the hand-off that tells the others.
    try:
        return _resolve(stage.fn)(ctx, out), None
    except Exception as e:  # noqa: BLE001 - re-raised by the caller after the hand-off
        return {}, e


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
    ap.add_argument("--runs-dir", default=str(REPO_ROOT / "runs"))
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="seconds this invocation may take: it stops cleanly before (exit 75) and a rerun resumes")
    args = ap.parse_args(argv)
    from pipelines.deadline import set_time_limit

    set_time_limit(args.time_limit)
    try:
        cfg = load_config(args.preset, args.set, teacher=args.teacher, student=args.student,
                          run_name=args.run_name)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return run_pipeline(cfg, Path(args.runs_dir))


def run_pipeline(cfg: PipelineConfig, runs_dir: Path) -> int:
    """Run every stage; under `accelerate launch` every process calls this, and rank 0 leads (see
    `pipelines.distributed`). Returns the exit code: 0 done, 2 cannot start, 3 an input or resource error."""
    from pipelines import distributed as dist

    try:
        device = dist.setup(cfg.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _lead(cfg, runs_dir, device) if dist.is_main() else _follow(cfg, runs_dir, device)
    finally:
        # The launcher stops every process as soon as one exits with an error: wait until rank 0 has said why.
        dist.barrier()
        dist.teardown()


def _lead(cfg: PipelineConfig, runs_dir: Path, device: Any) -> int:
    from pipelines import distributed as dist
    from pipelines.context import RunContext
    from pipelines.tracking import TrackingError, git_commit, setup_tracking

    run_dir = runs_dir / run_name(cfg)
    problem, exp_id = None, ""
    try:
        exp_id = setup_tracking()
    except TrackingError as e:
        problem = str(e)
    if problem is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "w")  # held until this process exits
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = f"another `make distill` is running in {run_dir}; wait for it or pass RUN=<other name>"
    dist.share(problem)  # the other ranks stop too
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device)
    tags = {"teacher": cfg.teacher, "student": cfg.student, "preset": cfg.preset, "git_commit": git_commit(),
            "processes": str(dist.world_size())}
    t0 = time.perf_counter()
    from pipelines.deadline import EXIT_CODE, TimeLimitReached

    try:
        report, summary, info = _run_stages(cfg, ctx, tags, exp_id, t0)
    except TimeLimitReached as e:
        print(f"\nstopped for the time limit: {e}. Finished stages and checkpoints are kept: run the same command "
              f"again to continue (exit code {EXIT_CODE}).", file=sys.stderr)
        return EXIT_CODE
    except user_errors() as e:
        # Input or resource problems the user fixes: the message says how; the traceback would bury it.
        # Finished stages and partial work (shards, checkpoints) stay; the same command resumes.
        print(f"\nerror ({type(e).__name__}): {e}", file=sys.stderr)
        return 3
    print(f"\nreport: {report.with_suffix('.md')}\n"
          f"retained quality (mean over tasks): {summary['retained_mean']:.3f}; "
          f"speedup ({summary['speedup_setting']}): {summary['speedup']:.2f}x\n"
          f"MLflow: experiment {exp_id}, run {info['parent_run_id']} ({info['tracking_uri']}); `make ui` to browse\n"
          f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _follow(cfg: PipelineConfig, runs_dir: Path, device: Any) -> int:
    """Ranks other than 0: no MLflow, no report; their share of the distributed stages only."""
    from pipelines import distributed as dist
    from pipelines.context import RunContext
    from pipelines.deadline import EXIT_CODE, TimeLimitReached

    if dist.share() is not None:
        return 2  # rank 0 could not start and says why
    ctx = RunContext(cfg=cfg, run_dir=runs_dir / run_name(cfg), device=device)
    try:
        for stage in _active_stages(cfg, ctx):
            ctx.records[stage.name] = follow_stage(stage, ctx)
    except TimeLimitReached:
        return EXIT_CODE  # rank 0 says so
    except dist.RankFailedError:
        return 3  # rank 0 prints the cause
    except user_errors() as e:
        print(f"\nerror on rank {dist.rank()} ({type(e).__name__}): {e}", file=sys.stderr)
        return 3
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a full disk / too small a device, each raised with the fix in its message."""
    from distill.trainer import BatchTooLargeError, NonFiniteLossError
    from resources.disk import DiskFullError
    from students.vocab import VocabMismatchError
    from teachers.load import ModelLoadError
    from teachers.topk_logit_cache import CacheCorruptError, CacheMismatchError

    from pipelines.distributed import RankFailedError
    from resources.bundle import BundleError
    from resources.fetch import FetchError

    return (ConfigError, ModelLoadError, VocabMismatchError, DiskFullError, BatchTooLargeError, NonFiniteLossError,
            CacheMismatchError, CacheCorruptError, NotImplementedError, RankFailedError, FetchError, BundleError)


def _active_stages(cfg: PipelineConfig, ctx: Any) -> Iterator[Stage]:
    """The stages this configuration runs, in order; stands in the records of switched-off ones for the report."""
    for stage in STAGES:
        if (stage.name == "latency" and not cfg.latency.enabled) or (
                stage.name in ("baseline", "eval_baseline") and not cfg.baseline.enabled):
            continue
        if stage.name == "report":
            if not cfg.latency.enabled:
                ctx.records["latency"] = {"outputs": {"compare": {}}, "output_hash": "disabled"}
            if not cfg.baseline.enabled:
                ctx.records["eval_baseline"] = {"outputs": {"metrics": None}, "output_hash": "disabled"}
        yield stage


def _run_stages(cfg: PipelineConfig, ctx: Any, tags: dict[str, str], exp_id: str,
                t0: float) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """Every stage in order under one parent MLflow run (marked FAILED if a stage raises)."""
    import mlflow

    from pipelines.tracking import flat_params

    with mlflow.start_run(run_name=ctx.run_dir.name, tags={**tags, "stage": "pipeline"}) as parent:
        mlflow.log_params(flat_params(cfg.to_dict()))
        mlflow.log_dict(cfg.to_dict(), "config.json")
        info = {"experiment_id": exp_id, "parent_run_id": parent.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
        ctx.records["_mlflow"] = info
        for stage in _active_stages(cfg, ctx):
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
