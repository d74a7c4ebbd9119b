"""`make sweep` / `moe-distill sweep`: search the KD recipe with Optuna, write the winner as a preset.

1. The pipeline runs up to its `student` and `logits` stages through the same stage machinery as `make distill`
   (`pipelines.stage_runner.run_stage`, same run folder), so stages already done are reused and what the sweep
   builds is reused by the next `make distill` of the same configuration.
2. The cached sequences are split: the last `val_fraction` of them are the validation slice, the rest are what
   every trial trains on. The final pipeline run trains on all sequences; the slice is part of the training
   text, never of the final evaluation (the benchmarks and the held-out documents of `data/heldout.jsonl`).
3. Each trial samples the knobs of `pipelines.sweep_space.SEARCH_SPACE` (TPE, fixed seed), trains a fresh copy
   of the student with `distill.trainer.train_student` exactly as the distill stage does (same loss, optimizer,
   schedule, data order and seed; `max_steps` = the trial budget), and after every `eval_every` optimizer steps
   scores it on the validation slice: the student's next-token cross-entropy in nats per token (lower is
   better). Each score goes to Optuna, whose median pruner stops trials that trail the others at that step.
4. Each trial is a nested MLflow run under one sweep parent run (params: the trial's values; metrics:
   `val/ce_nats` per step, `val/score`; tag `trial_state`: complete, pruned or failed).
5. The best trial's values are written as a preset (`base:` the preset the sweep ran on, plus the sweep's SET
   and DATA, plus the winning `distill:` values), with trials.csv and trials.json beside it.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, UserError, require
from pipelines.sweep_space import SEARCH_SPACE, Knob, check_space, sample

if TYPE_CHECKING:
    import optuna
    import torch

    from pipelines.config import PipelineConfig
    from pipelines.context import RunContext

SCORE = "val/ce_nats"  # the validation metric, per step, on each trial's MLflow run
TRIAL_STATES = ("complete", "pruned", "failed")


class NoTrialFinishedError(UserError):
    """Every trial was pruned or failed: there is no recipe to write."""

    kind = "sweep"


@dataclass
class SweepSettings:
    trials: int = 8  # Optuna trials
    steps: int = 0  # optimizer steps per trial; 0: the preset's own distill steps (what `make distill` trains)
    val_fraction: float = 0.25  # share of the cached sequences held out of the trials' training, for scoring
    seed: int = 0  # the TPE sampler's
    out: Path | None = None  # the preset to write; None: <run folder>/sweep/best.yaml

    def validate(self) -> None:
        require(self.trials >= 1, f"--trials must be >= 1, got {self.trials}")
        require(self.steps >= 0, f"--steps must be >= 0 (0: the preset's), got {self.steps}")
        require(0 < self.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.out is not None:
            require(self.out.suffix in (".yaml", ".yml"),
                    f"--out {self.out}: a preset is a YAML file; name it <something>.yaml")
            require(not self.out.is_dir(), f"--out {self.out} is a folder; give a file path ending in .yaml")


@dataclass
class TrialResult:
    number: int
    state: str  # one of TRIAL_STATES
    score: float  # the last validation score it reached (nan if none)
    steps: int  # optimizer steps trained
    values: dict[str, Any]
    seconds: float
    mlflow_run_id: str
    note: str = ""  # why a trial failed


@dataclass
class SweepResult:
    preset: Path
    best: TrialResult
    trials: list[TrialResult]
    parent_run_id: str
    command: str
    table: Path  # trials.csv (trials.json beside it)


def split_sequences(n: int, val_fraction: float, batch_size: int, corpus: int | None = None
                    ) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) over n cached sequences of which the first `corpus` (default all)
    are training text and the rest the teacher's own (logits.teacher_text_sequences): the last
    ceil(corpus * val_fraction) (at least one) corpus sequences are validation, everything else training; the
    score is on real text, never on the teacher's. Raises ConfigError when fewer than `batch_size`
    (distill.batch_size) would be left to train on."""
    corpus = n if corpus is None else corpus
    val = max(1, math.ceil(corpus * val_fraction))
    if n - val < batch_size or val >= corpus:
        raise ConfigError(f"the sweep holds out {val} of the {corpus} cached corpus sequences for validation "
                          f"(--val-fraction {val_fraction}), leaving {n - val}, fewer than distill.batch_size="
                          f"{batch_size}: raise data.train_tokens, lower distill.batch_size or --val-fraction")
    return list(range(corpus - val)) + list(range(corpus, n)), list(range(corpus - val, corpus))


def validation_ce(student: torch.nn.Module, dataset: torch.utils.data.Dataset, indices: list[int],
                  device: torch.device) -> float:
    """Mean next-token cross-entropy (nats per token) of `student` on the sequences `indices` of `dataset`
    (items with input_ids [S+1]: each sequence predicts its tokens 1..S from 0..S-1). One sequence per
    forward, so the logits held are [S, vocab] at most. Leaves the student in the mode it found it."""
    import torch

    was_training = student.training
    student.eval()
    total, tokens = 0.0, 0
    try:
        for i in indices:
            ids = dataset[i]["input_ids"].to(device)[None]
            with torch.no_grad():
                logits = student(input_ids=ids[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    finally:
        student.train(was_training)
    return total / tokens


def _with_values(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """A copy of `cfg` with the dotted keys of `values` set (the search space's own keys; types as sampled)."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return out


class _TrialFinished(Exception):
    """Raised from the last step's log callback: the score is in, and the trial's weights are not kept, so the
    trainer's closing checkpoint (model and optimizer state: over 1 GB for the default student) is skipped."""


@dataclass
class _Trials:
    """What every trial of one sweep shares."""

    ctx: RunContext  # the run: config, folder, device, the records of the stages the sweep ran
    cache: Any  # logit_cache.LogitCache, the logits stage's, opened (and checked) once
    train_idx: list[int]
    val_idx: list[int]
    steps: int  # optimizer steps per trial
    fixed: frozenset[str]  # searched keys the user set: held at their value
    space: dict[str, Knob]
    parent_tags: dict[str, str]
    teacher: Any  # the teacher for distill.teacher_mode=online, else None
    results: list[TrialResult] = dataclasses.field(default_factory=list)


def _trial(trial: optuna.Trial, run: _Trials) -> float:
    """One Optuna trial: sample, train a fresh student for `run.steps` steps on the training sequences, score
    it on the validation slice; the objective (lower is better), or NaN for a diverged trial."""
    import mlflow
    import optuna
    import torch

    from distill.trainer import NonFiniteLossError, train_student
    from pipelines.tracking import log_metrics
    from teachers.load import load_causal_lm

    ctx, cache, steps, val_idx = run.ctx, run.cache, run.steps, run.val_idx
    cfg = ctx.cfg
    values = sample(trial, cfg.to_dict(), run.fixed, run.space)
    dcfg = dataclasses.replace(_with_values(cfg, values).distill, max_steps=steps, checkpoint_every=steps)
    dcfg.validate(processes=1)
    train_set = torch.utils.data.Subset(cache, run.train_idx)
    student = load_causal_lm(ctx.output("student", "path"), "student", ctx.device, torch.float32,
                             cfg.teacher_options.trust_remote_code)
    eval_every = max(1, steps // 10)
    state, note, score, done_steps = "complete", "", math.nan, 0
    t0 = time.perf_counter()
    ckpt = ctx.run_dir / "sweep" / f"trial-{trial.number}"
    shutil.rmtree(ckpt, ignore_errors=True)  # a trial of an earlier, interrupted sweep: never resumed

    def log_fn(metrics: dict[str, float], step: int) -> None:
        nonlocal score, done_steps
        done_steps = step
        log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        if step % eval_every and step != steps:
            return
        score = validation_ce(student, cache, val_idx, ctx.device)
        log_metrics({SCORE: score}, step)
        trial.report(score, step)
        if step == steps:
            raise _TrialFinished
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {SCORE} {score:.4f}")

    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True,
                          tags={**run.parent_tags, "stage": "sweep_trial", "trial": str(trial.number)}) as mlrun:
        mlflow.log_params({**values, "trial": trial.number, "steps": steps})
        try:
            train_student(student, train_set, dcfg, ckpt, cache.meta.vocab_size, ctx.device, log_fn=log_fn,
                          teacher=run.teacher)
        except _TrialFinished:
            pass
        except optuna.TrialPruned as e:
            state, note = "pruned", str(e)
        except NonFiniteLossError as e:  # a diverging recipe (too high a rate): a bad trial, not a bad sweep
            state, note = "failed", str(e)
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
        seconds = time.perf_counter() - t0
        mlflow.set_tags({"trial_state": state, **({"trial_note": note[:4000]} if note else {})})
        log_metrics({"val/score": score, "trial/steps": done_steps, "trial/seconds": seconds})
    run.results.append(TrialResult(trial.number, state, score, done_steps, values, seconds, mlrun.info.run_id,
                                   note))
    print(f"[sweep] trial {trial.number}: {state}, {SCORE} {score:.4f} after {done_steps} of {steps} steps, "
          f"{seconds:.0f} s; {_short(values)}", flush=True)
    if state == "pruned":
        raise optuna.TrialPruned(note)
    # Optuna records a NaN objective as a failed trial, without the traceback a raised error would print.
    return math.nan if state == "failed" else score


def _short(values: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in values.items())


def preset_text(cfg: PipelineConfig, values: dict[str, Any], header: list[str]) -> str:
    """The preset a user passes to `make distill PRESET=<file>`: `base:` the preset the sweep ran on (a name, or
    an absolute path for a preset file), every value the sweep's SET and DATA changed from it, and the winning
    `values` (dotted keys), under `header` (comment lines)."""
    import yaml

    from pipelines.config import is_preset_path, load_config

    base_cfg = load_config(cfg.preset).to_dict()
    ran = cfg.to_dict()
    body: dict[str, Any] = {"device": ran["device"]} if ran["device"] != base_cfg["device"] else {}
    for section, entries in ran.items():  # SET / DATA changes; top-level options stay options (TEACHER, ...)
        if isinstance(entries, dict):
            changed = {k: v for k, v in entries.items() if v != base_cfg[section][k]}
            if section == "data" and "files" in changed:  # read from the current folder: make it absolute
                changed["files"] = [str(Path(f).expanduser().resolve()) for f in changed["files"]]
            if changed:
                body[section] = changed
    for key, value in values.items():
        section, leaf = key.split(".", 1)
        body.setdefault(section, {})[leaf] = value
    base = str(Path(cfg.preset).expanduser().resolve()) if is_preset_path(cfg.preset) else cfg.preset
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"base": base, **body}, sort_keys=False)


def _write_tables(trials: list[TrialResult], space: dict[str, Knob], folder: Path) -> tuple[Path, Path]:
    """trials.csv (one row per trial, one column per knob any trial sampled, in the table's order) and
    trials.json (the same, with each failed or pruned trial's note)."""
    keys = [k for k in space if any(k in t.values for t in trials)]
    csv_path, json_path = folder / "trials.csv", folder / "trials.json"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", "score", "steps", "seconds", *keys, "mlflow_run_id"])
        for t in trials:
            w.writerow([t.number, t.state, f"{t.score:.6f}", t.steps, f"{t.seconds:.1f}",
                        *(t.values.get(k, "") for k in keys), t.mlflow_run_id])
    json_path.write_text(json.dumps([{**dataclasses.asdict(t), "score": t.score if math.isfinite(t.score) else None}
                                     for t in trials], indent=1))
    return csv_path, json_path


def run_sweep(cfg: PipelineConfig, runs_dir: Path, settings: SweepSettings, fixed: frozenset[str] = frozenset(),
              pruner: optuna.pruners.BasePruner | None = None,
              space: dict[str, Knob] | None = None) -> SweepResult:
    """Run the sweep on `cfg` in the run folder `make distill` would use for it (its lock held throughout).

    fixed: dotted keys the user set (SET), held at their value instead of searched. pruner: default a median
    pruner (after the first quarter of the trials, at least two; from the first scored step). space: default
    SEARCH_SPACE. Raises UserError for bad input, RunFolderBusyError when the folder is in use, and
    NoTrialFinishedError when every trial was pruned or failed.
    """
    from pipelines.run_folder import locked_run_folder

    settings.validate()
    space = SEARCH_SPACE if space is None else space
    check_space(space, cfg)
    with locked_run_folder(cfg, runs_dir, "sweep") as (run_dir, device):
        return _sweep_locked(cfg, run_dir, device, settings, fixed, pruner, space)


def _sweep_locked(cfg: PipelineConfig, run_dir: Path, device: torch.device, settings: SweepSettings,
                  fixed: frozenset[str], pruner: optuna.pruners.BasePruner | None,
                  space: dict[str, Knob]) -> SweepResult:
    import mlflow
    import optuna

    from distill.trainer import total_steps
    from logit_cache import LogitCache
    from pipelines.config import load_config
    from pipelines.run_folder import command_run
    from pipelines.tracking import flat_params, log_metrics
    from teachers.fused import use_fused_kernels
    from teachers.load import load_teacher

    t0 = time.perf_counter()
    folder = run_dir / "sweep"
    with command_run(cfg, run_dir, device, "sweep", ("student", "logits")) as (ctx, parent_tags):
        cache = LogitCache(Path(ctx.output("logits", "cache")))
        n = len(cache)
        steps = settings.steps or total_steps(n, cfg.distill)  # what `make distill` trains on all n sequences
        train_idx, val_idx = split_sequences(n, settings.val_fraction, cfg.distill.batch_size,
                                             n - ctx.records["logits"]["outputs"].get("teacher_text_sequences", 0))
        folder.mkdir(parents=True, exist_ok=True)
        split = {"sequences": n, "training_sequences": train_idx, "validation_sequences": val_idx}
        (folder / "split.json").write_text(json.dumps(split))
        mlflow.log_params({**flat_params(cfg.to_dict()), "sweep.trials": settings.trials, "sweep.steps": steps,
                           "sweep.val_fraction": settings.val_fraction, "sweep.seed": settings.seed,
                           "sweep.validation_sequences": len(val_idx), "sweep.fixed": ",".join(sorted(fixed))})
        mlflow.log_dict({"space": {k: repr(v) for k, v in space.items()}, **split}, "sweep_space.json")
        print(f"[sweep] {settings.trials} trials of {steps} steps on {len(train_idx)} sequences; scored on the "
              f"last {len(val_idx)} ({SCORE}, lower is better)", flush=True)
        teacher = None
        if cfg.distill.needs_teacher():
            # once for every trial, as the distill stage loads it
            teacher, _ = load_teacher(ctx.output("teacher_tune", "path"), device, ctx.dtype,
                                      cfg.teacher_options.allow_dense, cfg.teacher_options.trust_remote_code)
            use_fused_kernels(teacher, device)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed here instead
        startup = max(2, settings.trials // 4)
        study = optuna.create_study(
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=startup),
            pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0))
        trials = _Trials(ctx, cache, train_idx, val_idx, steps, fixed, space, parent_tags, teacher)
        study.optimize(lambda t: _trial(t, trials), n_trials=settings.trials)
        results = trials.results
        csv_path, json_path = _write_tables(results, space, folder)
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(json_path))
        done = [r for r in results if r.state == "complete"]
        if not done:
            raise NoTrialFinishedError(f"all {len(results)} trials were pruned or failed ({csv_path}); run more "
                                       "--trials, or hold a knob fixed with --set (e.g. distill.lr=1e-4)")
        best = min(done, key=lambda r: r.score)
        out = (settings.out or folder / "best.yaml").expanduser().resolve()  # the command works from any folder
        out.parent.mkdir(parents=True, exist_ok=True)
        command = _command(cfg, out)
        header = [f"Written by `moe-distill sweep` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
                  f"(MLflow run {parent_tags['parent']}).",
                  f"Best of {len(results)} trials ({len(done)} complete): trial {best.number}, {SCORE} "
                  f"{best.score:.4f} on the last {len(val_idx)} of {n} cached sequences after {steps} steps.",
                  f"Use it: {command}"]
        if settings.steps and settings.steps != total_steps(n, cfg.distill):
            header.append(f"The trials trained {steps} steps; this preset trains the base's "
                          f"{total_steps(n, cfg.distill)}.")
        out.write_text(preset_text(cfg, best.values, header))
        load_config(str(out), teacher=cfg.teacher, student=cfg.student)  # it must load as written
        mlflow.log_artifact(str(out))
        mlflow.log_params({"sweep.best_trial": best.number, "sweep.preset": str(out.resolve())})
        log_metrics({"sweep/best_score": best.score, "sweep/complete": len(done),
                     "sweep/pruned": sum(r.state == "pruned" for r in results),
                     "sweep/failed": sum(r.state == "failed" for r in results),
                     "sweep/seconds": time.perf_counter() - t0})
    return SweepResult(out, best, results, parent_tags["parent"], command, csv_path)


def _command(cfg: PipelineConfig, preset: Path) -> str:
    """The `make distill` line that runs the written preset with the sweep's teacher and student."""
    from pipelines.config import PipelineConfig

    parts = ["make distill", f"PRESET={_shell(str(preset))}"]
    if cfg.teacher != PipelineConfig.teacher:
        parts.append(f"TEACHER={_shell(cfg.teacher)}")
    if cfg.student != PipelineConfig.student:
        parts.append(f"STUDENT={_shell(cfg.student)}")
    return " ".join(parts)


def _shell(text: str) -> str:
    import shlex

    return shlex.quote(text)


def main(preset: str, overrides: str, data: str, teacher: str, student: str, run_name: str, runs_dir: Path,
         settings: SweepSettings) -> int:
    """`moe-distill sweep`: load the config as `moe-distill run` does, run the sweep, print where the preset is
    and the command that uses it. Returns 0; UserError propagates to the command line (one line, its code)."""
    from pipelines.config import load_config, parse_overrides
    from pipelines.run import with_data

    parsed = with_data(overrides, data)
    cfg = load_config(preset, parsed, teacher=teacher, student=student, run_name=run_name)
    set_keys = parse_overrides(overrides) if overrides else {}
    fixed = frozenset(k for k in SEARCH_SPACE if _has(set_keys, k))
    result = run_sweep(cfg, runs_dir, settings, fixed)
    ok = [t for t in result.trials if t.state == "complete"]
    print(f"\n{len(result.trials)} trials: {len(ok)} complete, "
          f"{sum(t.state == 'pruned' for t in result.trials)} pruned, "
          f"{sum(t.state == 'failed' for t in result.trials)} failed; table: {result.table} (and .json)")
    print(f"best: trial {result.best.number}, {SCORE} {result.best.score:.4f}; {_short(result.best.values)}")
    print(f"preset: {result.preset}\nrun it:  {result.command}", flush=True)
    return 0


def _has(nested: dict[str, Any], key: str) -> bool:
    node: Any = nested
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True

