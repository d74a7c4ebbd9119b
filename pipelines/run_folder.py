"""The run folder of a command that works beside `make distill` in one process (`sweep`, `ab`): the folder
`make distill` would use for the same options, checked, locked and tracked for as long as the command runs."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from core.errors import ConfigError, UserError, require

if TYPE_CHECKING:
    import torch

    from pipelines.config import PipelineConfig
    from pipelines.context import RunContext


class RunFolderBusyError(UserError):
    """Another pipeline run, sweep or comparison holds the run folder."""

    kind = "busy"
    exit_code = 2


@contextmanager
def locked_run_folder(cfg: PipelineConfig, runs_dir: Path, command: str) -> Iterator[tuple[Path, torch.device]]:
    """(run folder, device) for `moe-distill <command>` on `cfg`: one process only, the device set up, MLflow
    tracking set, the folder writable and its lock held (RunFolderBusyError when another command holds it), and
    the pre-stage checks run (their notes printed). The lock is released on leaving."""
    from filelock import FileLock, Timeout

    from core import distributed as dist
    from pipelines.preflight import check_writable, local_artifact_dir, preflight
    from pipelines.run import run_name
    from pipelines.tracking import artifact_location, setup_tracking

    require(dist.world_size() == 1, f"moe-distill {command} runs as one process: start it without accelerate "
                                    "launch (no GPUS=)")
    try:
        device = dist.setup(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_dir = runs_dir / run_name(cfg)
    exp_id = setup_tracking()
    check_writable(run_dir, "run folder")
    lock = FileLock(run_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderBusyError(f"another `make distill`, sweep or comparison is running in {run_dir}; wait for it "
                                 "or pass RUN=<other name>") from None
    try:
        for note in preflight(cfg, run_dir, local_artifact_dir(artifact_location(exp_id))):
            print(f"note: {note}", flush=True)
        yield run_dir, device
    finally:
        lock.release()


@contextmanager
def command_run(cfg: PipelineConfig, run_dir: Path, device: torch.device, command: str,
                targets: tuple[str, ...]) -> Iterator[tuple[RunContext, dict[str, str]]]:
    """An MLflow parent run `<command> <run>` (tagged with teacher, student, preset, git commit and
    stage=<command>) in which the stages `targets` need have run or been reused (pipelines.stage_runner, as
    `make distill` runs them); yields (the run context holding their records, the tags for nested runs)."""
    import mlflow

    from pipelines.context import RunContext
    from pipelines.stage_runner import run_stage, stages_for
    from pipelines.tracking import git_commit

    tags = {"teacher": cfg.teacher, "student": cfg.student, "preset": cfg.preset, "git_commit": git_commit()}
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device)
    with mlflow.start_run(run_name=f"{command} {run_dir.name}", tags={**tags, "stage": command}) as parent:
        parent_tags = {**tags, "parent": parent.info.run_id}
        for stage in stages_for(cfg, targets):
            ctx.records[stage.name] = run_stage(stage, ctx, parent_tags)
        yield ctx, parent_tags
