"""`moe-distill ab` / `make ab`: KD recipes side by side at one budget, and which wins, with intervals.

1. The pipeline runs, through the same stage machinery and run folder as `make distill`, everything the
   comparison needs once: the student, the logit cache, the cross-entropy baseline (always on here) and the
   teacher's and the baseline's evaluations. Finished stages are reused.
2. Each variant is the run's configuration plus its own `distill.*` settings (a SET string, or the `distill:`
   section of a preset file such as the one `make sweep` writes). Settings that change the budget or the data
   order (steps, epochs, batch sizes, seed) are refused: every variant trains the same student from the same
   initialisation on the same sequences in the same order for the same optimizer steps. Its `distill` and
   `eval_student` stages run in `runs/<run>/ab/<variant>/` (reused on a rerun when unchanged), each an MLflow
   run tagged with the variant.
3. `runs/<run>/ab/ab.md` and `ab.json`: per variant the mean retained gain over the headline metrics (the
   report's rule: counted where the teacher beats chance and the baseline by two standard errors) with its
   paired bootstrap interval, the loss positions it trained on, and per counted metric its paired difference
   to the CE baseline; against the first variant that finished (the reference), the interval of the
   difference in mean retained gain and, per counted metric, of the difference in score; and the winner, with
   whether its lead over the reference excludes zero. A variant that fails is named in
   the table with its error and the others still run; the command then exits 1 (rerun it: finished
   variants are reused).
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from core.errors import ConfigError, require

if TYPE_CHECKING:
    import torch

    from pipelines.config import PipelineConfig
    from pipelines.context import RunContext

# What every variant shares: the budget and the data order. A variant changes how the student learns, not how much.
BUDGET_KEYS = frozenset({"max_steps", "epochs", "batch_size", "micro_batch_size", "seed", "parallel"})
# The comparison: the cache with forward KL (whatever the run's own distill section says), a quarter of
# the steps on-policy, layer-wise transfer (derived students only).
DEFAULT_VARIANTS = (("cache", ""), ("on_policy", "distill.on_policy_rate=0.25"),
                    ("layer_wise", "distill.teacher_mode=online distill.layer_weight=0.5"))
NEEDED = ("student", "logits", "eval_teacher", "eval_baseline")


@dataclass(frozen=True)
class Variant:
    name: str
    distill: dict[str, Any]  # the variant's distill.* settings, as parsed (values still text or YAML values)
    source: str  # the SET text or the preset file it came from


def parse_variant(name: str, spec: str) -> Variant:
    """A variant from its name (a folder name) and its settings: SET text of distill.* keys, or a YAML file whose
    `distill:` section is taken. Raises ConfigError naming what is wrong."""
    from pipelines.config import parse_overrides

    require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None and ".." not in name,
            f"variant name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder under ab/)")
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise ConfigError(f"variant {name}: {spec} is not a file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"variant {name}: {spec} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("distill"), dict):
            raise ConfigError(f"variant {name}: {spec} has no `distill:` section to compare")
        settings = {"distill": loaded["distill"]}
    else:
        settings = parse_overrides(spec)
    other = sorted(k for k in settings if k != "distill")
    require(not other, f"variant {name}: only distill.* settings differ between variants (got {', '.join(other)}); "
            "set the others for all of them with --set")
    budget = sorted(BUDGET_KEYS & set(settings.get("distill", {})))
    require(not budget, f"variant {name}: distill.{', distill.'.join(budget)} would change the budget or the data "
            "order, which every variant shares; set it for all of them with --set")
    return Variant(name, dict(settings.get("distill", {})), spec)


def default_variants(cfg: PipelineConfig) -> list[Variant]:
    """The issue's three, layer-wise only for a derived student (its layers map to the teacher's)."""
    return [parse_variant(n, s) for n, s in DEFAULT_VARIANTS if n != "layer_wise" or cfg.student == "derived"]


def _quality(ctx: RunContext, rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(quality rows, headline summary, per-example scores by role) of one variant's evaluation."""
    from eval import per_example
    from pipelines.stages.report import headline_summary, quality_rows

    scores = {"teacher": per_example.read(Path(ctx.output("eval_teacher", "per_example"))),
              "baseline": per_example.read(Path(ctx.output("eval_baseline", "per_example"))),
              "student": per_example.read(Path(rec["outputs"]["per_example"]))}
    quality = quality_rows({"teacher": ctx.output("eval_teacher", "metrics"), "student": rec["outputs"]["metrics"],
                            "baseline": ctx.output("eval_baseline", "metrics")}, scores)
    return quality, headline_summary(quality, scores), scores


def compare(ctx: RunContext, variants: list[Variant], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison table from each variant's `eval_student` and `distill` records (see the module doc)."""
    from eval import bootstrap, per_example

    per: dict[str, Any] = {}
    for v in variants:
        quality, summary, scores = _quality(ctx, records[v.name]["eval_student"])
        per[v.name] = {"quality": quality, "summary": summary, "scores": scores,
                       "trained_tokens": records[v.name]["distill"]["outputs"].get("tokens"),
                       "settings": v.distill, "source": v.source}
    ref = variants[0].name
    counted = per[ref]["summary"]["headline"]["metrics"]  # the rule reads teacher and baseline only: one set
    out: dict[str, Any] = {"reference": ref, "counted_metrics": counted, "rule": per[ref]["summary"]["headline"]["rule"],
                           "higher_is_better": {k: bool(per[ref]["quality"][k]["higher_is_better"]) for k in counted},
                           "variants": {}}
    for v in variants:
        p = per[v.name]
        row: dict[str, Any] = {"settings": p["settings"], "source": p["source"], "trained_tokens": p["trained_tokens"],
                               "retained_gain_mean": p["summary"].get("retained_gain_mean"),
                               "retained_gain_mean_ci": p["summary"].get("retained_gain_mean_ci"),
                               "retained_mean": p["summary"].get("retained_mean"),
                               "metrics": {k: {"score": p["quality"][k]["student"],
                                               "stderr": p["quality"][k]["stderr"].get("student")}
                                           for k in counted}}
        # Against the CE baseline, per metric: what the recipe bought over plain fine-tuning, in the metric's units
        # (the report's own paired interval of student minus baseline, from quality_rows).
        row["minus_baseline"] = {k: p["quality"][k]["student_minus_baseline"] for k in counted
                                 if "student_minus_baseline" in p["quality"][k]}
        if v.name != ref:
            tasks, diffs = [], {}
            for k in counted:
                have = {"teacher": p["scores"]["teacher"].get(k), "a": p["scores"]["student"].get(k),
                        "b": per[ref]["scores"]["student"].get(k), "baseline": p["scores"]["baseline"].get(k)}
                if any(x is None for x in have.values()):
                    continue
                paired = per_example.paired(have)
                stream = k.rpartition("/")[0]
                diffs[k] = bootstrap.paired_difference(paired["a"], paired["b"], stream=stream)
                tasks.append((stream, paired["teacher"], paired["a"], paired["b"], paired["baseline"],
                              bool(p["quality"][k]["higher_is_better"])))
            row["minus_reference"] = {"retained_gain_mean": bootstrap.mean_gain_difference(tasks), "metrics": diffs}
        out["variants"][v.name] = row
    gains = {n: r["retained_gain_mean"] for n, r in out["variants"].items()
             if isinstance(r["retained_gain_mean"], float) and math.isfinite(r["retained_gain_mean"])}
    if gains:
        best = max(gains, key=gains.__getitem__)
        lead = out["variants"][best].get("minus_reference", {}).get("retained_gain_mean")
        out["winner"] = {"variant": best, "retained_gain_mean": gains[best],
                         "lead_over_reference": lead, "clear": bool(lead and lead.get("excludes_zero"))}
    return out


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _ci(ci: Any) -> str:
    if not isinstance(ci, dict) or not all(isinstance(ci.get(k), float) and math.isfinite(ci[k]) for k in ("low", "high")):
        return "n/a"
    return f"[{_pct(ci['low'])}, {_pct(ci['high'])}]"


def _diff(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" + (" *" if d["excludes_zero"] else "")


def to_markdown(table: dict[str, Any], run: str) -> str:
    """ab.md: the variants, their mean retained gain with its interval, and the differences to the reference."""
    ref = table["reference"]
    lines = [f"# KD recipes side by side: {run}", "",
             f"Every variant trained the same student from the same initialisation on the same sequences for the same "
             f"optimizer steps; only its `distill` settings differ. Retained gain = (variant - CE baseline) / (teacher "
             f"- CE baseline), averaged over the headline metrics the report counts: "
             f"{', '.join(table['counted_metrics']) or 'none'}. Intervals: paired bootstrap, 95%, over the "
             "evaluation examples.", "", f"The rule: {table['rule']}", "",
             "| variant | settings | loss positions trained | mean retained gain | 95% interval | minus "
             f"{ref} | 95% interval |", "|---|---|---|---|---|---|---|"]
    for name, r in table["variants"].items():
        settings = " ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(the run's own)"
        d = (r.get("minus_reference") or {}).get("retained_gain_mean")
        lines.append(f"| {name} | {settings} | {r['trained_tokens']} | {_pct(r['retained_gain_mean'])} | "
                     f"{_ci(r['retained_gain_mean_ci'])} | {_pct(d['estimate']) if d else '-'} | {_ci(d) if d else '-'} |")
    for name, error in (table.get("failed") or {}).items():
        lines.append(f"| {name} | failed: {error} | - | - | - | - | - |")
    win = table.get("winner")
    lines += [""]
    if win:
        clear = "its lead over the reference excludes zero" if win["clear"] else (
            "the reference itself" if win["variant"] == ref else "but its lead over the reference does not exclude zero")
        lines.append(f"Highest mean retained gain: **{win['variant']}** ({_pct(win['retained_gain_mean'])}); {clear}.")
    else:
        lines.append("No variant has a defined mean retained gain: no headline metric was counted (see the rule).")
    lines += ["", "## Per metric: variant minus CE baseline (score, paired bootstrap 95%)", ""]
    names = list(table["variants"])
    if names and table["counted_metrics"]:
        lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in table["counted_metrics"]:
            cells = [_diff(table["variants"][n].get("minus_baseline", {}).get(k)) for n in names]
            better = "higher" if table.get("higher_is_better", {}).get(k, True) else "lower"
            lines.append(f"| {k} ({better} is better) | " + " | ".join(cells) + " |")
    else:
        lines.append("None: no headline metric counted.")
    lines += ["", "## Per metric: variant minus reference (score, paired bootstrap 95%)", ""]
    others = [n for n in table["variants"] if n != ref]
    if others and table["counted_metrics"]:
        lines += ["| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for k in table["counted_metrics"]:
            cells = []
            for n in others:
                cells.append(_diff(table["variants"][n]["minus_reference"]["metrics"].get(k)))
            better = "higher" if table.get("higher_is_better", {}).get(k, True) else "lower"
            lines.append(f"| {k} ({better} is better) | " + " | ".join(cells) + " |")
        lines += ["", "\\* the interval excludes zero."]
    else:
        lines.append("None: no headline metric counted, or a single variant.")
    return "\n".join(lines) + "\n"


def run_ab(cfg: PipelineConfig, runs_dir: Path, variants: list[Variant]) -> Path:
    """Run the comparison in the run folder `make distill` would use for `cfg` (its lock held); returns ab.md."""
    from pipelines.run_folder import locked_run_folder

    require(len(variants) >= 2, "a comparison needs at least two variants")
    names = [v.name for v in variants]
    require(len(set(names)) == len(names), f"variant names must differ: {', '.join(names)}")
    configs = {v.name: _variant_config(cfg, v) for v in variants}  # every variant checked before any stage
    with locked_run_folder(cfg, runs_dir, "ab") as (run_dir, device):
        return _run_locked(cfg, configs, variants, run_dir, device)


def run_variants(variants: list[Variant], run_one: Callable[[Variant], dict[str, Any]]
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run each variant with `run_one` (its stage records back); a variant that fails is recorded (its error
    in one line) and the others still run, so that one broken recipe costs its own stages, not the comparison's
    (on a lent GPU, the rest of the budget). A time limit or Ctrl-C stops everything, as anywhere else. Returns
    (records of the finished variants, {failed variant: error}); raises the first error when none finished."""
    from core.deadline import TimeLimitReached

    records: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    first: BaseException | None = None
    for v in variants:
        try:
            records[v.name] = run_one(v)
        except (TimeLimitReached, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one recipe; the table names it
            first = first or e
            failed[v.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"[ab] variant {v.name} failed ({failed[v.name]}); going on with the others", file=sys.stderr,
                  flush=True)
    if not records and first is not None:
        raise first
    return records, failed


def _variant_config(cfg: PipelineConfig, v: Variant) -> PipelineConfig:
    import copy

    from pipelines.config import apply_values, validate

    out = copy.deepcopy(cfg)
    try:
        apply_values(out, {"distill": v.distill})
        validate(out)
    except ConfigError as e:
        raise ConfigError(f"variant {v.name}: {e}") from None
    return out


def _run_locked(cfg: PipelineConfig, configs: dict[str, PipelineConfig], variants: list[Variant], run_dir: Path,
                device: torch.device) -> Path:
    import mlflow

    from pipelines.context import RunContext
    from pipelines.run_folder import command_run
    from pipelines.stage_runner import run_stage
    from pipelines.stage_table import BY_NAME
    from pipelines.tracking import log_metrics

    folder = run_dir / "ab"
    with command_run(cfg, run_dir, device, "ab", NEEDED) as (ctx, parent_tags):
        def run_one(v: Variant) -> dict[str, Any]:
            settings = v.source or "(the run's own distill settings)"
            print(f"[ab] variant {v.name}: {settings}", flush=True)
            vctx = RunContext(cfg=configs[v.name], run_dir=folder / v.name, device=device)
            vctx.records = dict(ctx.records)
            for name in ("distill", "eval_student"):
                vctx.records[name] = run_stage(BY_NAME[name], vctx, {**parent_tags, "variant": v.name})
            return vctx.records

        records, failed = run_variants(variants, run_one)
        table = compare(ctx, [v for v in variants if v.name in records], records)
        table["failed"] = failed
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ab.json").write_text(json.dumps(table, indent=1, default=str))
        md = folder / "ab.md"
        md.write_text(to_markdown(table, run_dir.name))
        log_metrics({f"ab/{n}/retained_gain_mean": r["retained_gain_mean"] for n, r in table["variants"].items()
                     if isinstance(r["retained_gain_mean"], float) and math.isfinite(r["retained_gain_mean"])})
        mlflow.log_artifact(str(md))
        mlflow.log_artifact(str(folder / "ab.json"))
    return md


def main(preset: str, overrides: str, data: str, teacher: str, student: str, run_name: str, runs_dir: Path,
         specs: list[tuple[str, str]], best: str = "", time_limit: float = 0) -> int:
    """`moe-distill ab`: the base config as `moe-distill run` loads it (the CE baseline switched on), the
    variants (default: DEFAULT_VARIANTS), the comparison; prints the table's path and its verdict."""
    from pipelines.config import load_config
    from pipelines.run import with_data

    parsed = with_data(overrides, data)
    cfg = load_config(preset, parsed, teacher=teacher, student=student, run_name=run_name)
    cfg.baseline.enabled = True  # retained gain needs it; the stage is shared by every variant
    from core.deadline import EXIT_CODE, TimeLimitReached, set_time_limit

    variants = [parse_variant(n, s) for n, s in specs] if specs else default_variants(cfg)
    if best:
        variants.append(parse_variant("sweep_best", best))
    set_time_limit(time_limit)
    try:
        md = run_ab(cfg, runs_dir, variants)
    except TimeLimitReached as e:
        print(f"\nstopped for the time limit: {e}. Finished stages and checkpoints are kept: run the same command "
              f"again to continue (exit code {EXIT_CODE}).", file=sys.stderr)
        return EXIT_CODE
    table = json.loads((md.parent / "ab.json").read_text())
    for name, error in (table.get("failed") or {}).items():
        print(f"error (ab): variant {name} failed: {error}; the others are compared in {md}. Fix it and run the "
              "same command again: finished variants are reused", file=sys.stderr)
    win = table.get("winner")
    print(f"\ncomparison: {md}")
    if win:
        print(f"highest mean retained gain: {win['variant']} ({_pct(win['retained_gain_mean'])})"
              + ("" if win["variant"] == table["reference"] else
                 f"; lead over {table['reference']} {'excludes' if win['clear'] else 'does not exclude'} zero"))
    return 1 if table.get("failed") else 0
