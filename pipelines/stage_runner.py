"""Run one stage, or reuse its output: the decision, the MLflow run around it, and the hand-offs between ranks.

A stage reruns exactly when its input hash changes (`input_hash`: config entries, code identity, upstream
output hashes, device). `plan` tells which stages a run would redo, and why, without running anything.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from core import deadline, interrupt
from core import distributed as dist
from core.deadline import TimeLimitReached
from core.disk import disk_full_error, is_disk_full
from core.errors import UserError
from core.hashing import hash_text
from pipelines.code_identity import code_identity
from pipelines.paths import REPO_ROOT
from pipelines.stage_cache import is_fresh, read_stage, write_stage
from pipelines.stage_table import BY_NAME, STAGES, Stage

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


def active_stages(cfg: PipelineConfig) -> Iterator[Stage]:
    """The stages this configuration runs, in order."""
    return (s for s in STAGES if s.enabled(cfg))


def stages_for(cfg: PipelineConfig, targets: tuple[str, ...]) -> list[Stage]:
    """The active stages that `targets` need: those and everything upstream of them, in run order."""
    need: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(BY_NAME[name].upstream)
    return [s for s in active_stages(cfg) if s.name in need]


def stand_in_records(cfg: PipelineConfig, records: dict[str, dict]) -> None:
    """Records for the switched-off stages the report reads, so it can say they are off."""
    if not cfg.latency.enabled:
        records.setdefault("latency", {"outputs": {"compare": {}}, "output_hash": "disabled"})
    for stage in STAGES:  # any other switched-off stage: an empty record the report reads as "not run"
        if not stage.enabled(cfg):
            records.setdefault(stage.name, {"outputs": {}, "output_hash": "disabled"})


def remove_stage_dir(out: Path, run_dir: Path) -> None:
    """Delete a stage's folder, which must lie inside the run folder: never anything outside it."""
    real, run_dir = out.resolve(), run_dir.resolve()
    if out.is_symlink() or run_dir not in real.parents:
        # A link (or a run folder moved under a link) would make rmtree delete what the link points to.
        raise UserError(f"refusing to delete {out}: it resolves to {real}, outside the run folder {run_dir}; "
                        "remove that link by hand, or pass RUN=<new name>")
    shutil.rmtree(real)


def plan(cfg: PipelineConfig, run_dir: Path, device: str, root: Path = REPO_ROOT,
         stages: list[Stage] | None = None, known: tuple[dict[str, dict], dict[str, str]] | None = None
         ) -> dict[str, str]:
    """What a run of `cfg` in `run_dir` would do with each stage (`stages`, default all active ones): "reuse",
    or "run: <why>". A stage whose upstream reruns is counted as rerunning too (its inputs will change unless
    the upstream output comes out byte-identical, in which case the real run reuses it after all). `known`:
    (records, decisions) of upstream stages planned elsewhere (the shared stages of an extra student's)."""
    records: dict[str, dict] = dict(known[0]) if known else {}
    stand_in_records(cfg, records)
    decided = dict(known[1]) if known else {}
    out: dict[str, str] = {}
    for stage in (stages if stages is not None else active_stages(cfg)):
        rerun_ups = [u for u in stage.upstream if {**decided, **out}.get(u, "reuse") != "reuse"]
        rec = read_stage(run_dir / stage.name)
        if rerun_ups:
            out[stage.name] = f"run: upstream {', '.join(rerun_ups)} reruns"
        elif rec is None or not rec.get("complete"):
            out[stage.name] = "run: no finished output"
        elif rec.get("input_hash") != input_hash(stage, cfg, records, device, root):
            out[stage.name] = "run: its config, code or inputs changed"
        else:
            out[stage.name] = "reuse"
        records[stage.name] = rec or {"output_hash": "pending"}
    return out


def input_hash(stage: Stage, cfg: PipelineConfig, records: dict[str, dict], device: str,
               root: Path = REPO_ROOT) -> str:
    """Everything the stage's output depends on: its name, its config entries, its code (the import closure of
    its module under `root`), the content of the files it reads from outside (a user's model), its upstream
    stages' output hashes and, for device stages, the device type."""
    ups = [f"{u}={records[u]['output_hash']}" for u in stage.upstream]
    return hash_text(stage.name, cfg.section_hash(*stage.config) if stage.config else "",
                     code_identity(stage.module, root), *stage.external(cfg), *ups,
                     device if stage.uses_device else "")


def run_stage(stage: Stage, ctx: Any, parent_tags: dict[str, str]) -> dict[str, Any]:
    """Reuse the stage's output if its inputs are unchanged, else (re)run it; log either way to MLflow.

    Rank 0 of a multi-process launch (see `pipelines.distributed`); the other ranks call `follow_stage`.
    """
    import mlflow

    from pipelines.tracking import flat_params, log_metrics, stage_run

    out = ctx.stage_dir(stage.name)
    h = input_hash(stage, ctx.cfg, ctx.records, ctx.device.type)
    rec = is_fresh(out, h)
    cfg_part = {s: ctx.cfg.to_dict()[s] for s in stage.config}
    # Whether the other ranks are waiting for a hand-off from here: whatever fails while they are (MLflow, a
    # full disk in the bookkeeping) is handed to them as an error instead of leaving them waiting.
    handoff_due = True
    try:
        interrupt.check()  # a Ctrl-C swallowed somewhere in the stage before stops the run here
        if rec is None:  # before the stage's MLflow run opens or anything of its folder changes
            deadline.check_stage_start(stage.name)
        reused = rec is not None
        # A reused stage gets a light run: tags pointing at the run that produced its output, no copied params
        # or metrics (they live on that run). A stage that runs long also records system metrics (CPU, memory,
        # GPU), sampled by MLflow in the background.
        with stage_run(stage.name, {**parent_tags, "skipped": str(reused).lower()},
                       system_metrics=stage.long and not reused) as run:
            if reused:
                handoff_due = False
                dist.share(("reuse", rec))
                print(f"[{stage.name}] inputs unchanged ({h}); reusing {out}", flush=True)
                producer = rec.get("mlflow_run_id", "")
                mlflow.set_tags({"produced_by_run_id": producer, "mlflow.note.content":
                                 f"Reused: inputs unchanged ({h}); outputs, params and metrics are those of run "
                                 f"{producer}."})
                return rec
            mlflow.log_params(flat_params(cfg_part))
            old = read_stage(out)
            if old and old.get("input_hash") != h and out.exists():
                # Different inputs: earlier partial work (shards, checkpoints) belongs to another configuration.
                remove_stage_dir(out, ctx.run_dir)
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
    if message.startswith(f"{TimeLimitReached.__name__}:"):  # not a failure: every rank stops and resumes later
        return TimeLimitReached(message)
    return dist.RankFailedError(f"rank 0 failed in stage {stage.name}: {message}")


def _call_stage(stage: Stage, ctx: Any, out: Path) -> tuple[dict[str, Any], BaseException | None]:
    # Caught rather than raised so that every rank reaches the hand-off that tells the others.
    try:
        return stage.fn(ctx.for_stage(stage.name, stage.config), out), None
    except Exception as e:  # noqa: BLE001 - re-raised by the caller after the hand-off
        if is_disk_full(e) and not isinstance(e, UserError):
            # A write no guard of ours wraps (a library saving a model): the same one-line error. The stage's
            # record stays incomplete, so a rerun redoes it; earlier stages and checkpoints are untouched.
            return {}, _from(disk_full_error(out, f"running stage {stage.name} in {out}"), e)
        return {}, e


def _from(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error
