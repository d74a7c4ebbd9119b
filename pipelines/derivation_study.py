"""`make compare-derivations`: the student derivation methods compared on one teacher, same KD budget each.

Each variant is one ordinary pipeline run (`runs/derive-<variant>/`, its own MLflow run) that differs from the
others only in `student_options`; the stages that do not depend on the student (teacher, data, logits,
teacher eval) are computed once and reused by the others through the stage cache. The table ranks variants
by held-out bits per byte after distillation: on a small eval limit the task accuracies move by one example
at a time (standard errors ~0.1), while bits per byte over the held-out documents is a stable measure.

    python -m pipelines.derivation_study --preset default --out docs/results/derivation_methods
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipelines.config import REPO_ROOT, load_config
from pipelines.run import run_name, run_pipeline

# name -> student_options overrides. select at full width and svd at full rank equal frequency (tested in
# tests/test_expert_merge.py), and on a teacher whose experts are equal frequency equals uniform; the default
# list holds the choices that give different students there. `--variants frequency,...` adds others.
VARIANTS: dict[str, str] = {  # keep_layers explicit in each, so a change of the preset's default changes none
    "uniform": "student_options.method=uniform student_options.keep_layers=every_2",
    "svd-r288": "student_options.method=svd student_options.svd_rank=288 student_options.keep_layers=every_2",
    "select-w768": "student_options.method=select student_options.ffn_width=768 student_options.keep_layers=every_2",
    "uniform-top16": "student_options.method=uniform student_options.keep_layers=top_16",
    "frequency": "student_options.method=frequency student_options.keep_layers=every_2",
    "select": "student_options.method=select student_options.keep_layers=every_2",
}
DEFAULT_VARIANTS = ("uniform", "svd-r288", "select-w768", "uniform-top16")
SHARED_STAGES = ("teacher", "data", "teacher_tune", "logits", "eval_teacher")
VARIANT_STAGES = ("student", "distill", "eval_student_init", "eval_student")  # the work each variant does
RANK_METRIC = "heldout_text/bits_per_byte"


def seed_shared_stages(src: Path, dst: Path) -> None:
    """Let `dst` reuse the student-independent stages of `src`: their records point at `src`'s files, and the
    stage cache reruns any whose inputs differ (a changed preset, changed code)."""
    for stage in SHARED_STAGES:
        rec = src / stage / "stage.json"
        if rec.is_file() and not (dst / stage / "stage.json").is_file():
            (dst / stage).mkdir(parents=True, exist_ok=True)
            shutil.copy2(rec, dst / stage / "stage.json")


def summarise(name: str, overrides: str, report: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One row of the comparison from a run's report.json and stage records."""
    q = report["quality"]
    accs = [k for k, v in q.items() if k.endswith("/acc") and v.get("student") is not None]

    def mean(role: str) -> float:  # nan where the role was not scored (eval.student_init=false)
        vals = [q[k].get(role) for k in accs]
        return sum(vals) / len(vals) if vals and None not in vals else float("nan")

    def get(metric: str, role: str) -> float:
        value = q.get(metric, {}).get(role)
        return float("nan") if value is None else value

    return {"variant": name, "overrides": overrides, "student": report["student"]["name"],
            "params": report["student"]["params_total"],
            "bpb_init": get(RANK_METRIC, "student_init"), "bpb": get(RANK_METRIC, "student"),
            "bpb_teacher": get(RANK_METRIC, "teacher"),
            "lambada_ppl": get("lambada_openai/perplexity", "student"),
            "acc_mean_init": mean("student_init"), "acc_mean": mean("student"), "acc_mean_teacher": mean("teacher"),
            "retained_mean": report["summary"]["retained_mean"],
            "final_kd": report["training"].get("final_kd"), "run": report["run"]["name"],
            "minutes": sum(json.loads((run_dir / st / "stage.json").read_text()).get("seconds", 0.0)
                           for st in VARIANT_STAGES if (run_dir / st / "stage.json").is_file()) / 60}


def write_study(rows: list[dict[str, Any]], out: Path, command: str, preset: str, notes: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ranked = sorted(rows, key=lambda r: r["bpb"])
    best = ranked[0]
    lines = [
        "# Student derivation methods on the default teacher", "",
        f"Made by `{command}` (preset `{preset}`); raw numbers in `{out.with_suffix('.csv').name}`. Each "
        "variant is a full pipeline run with the same data, teacher cache and KD budget; only `student_options` "
        "differ. Ranked by held-out bits per byte after distillation (lower is better); `init` is the derived "
        "student before any training; `min` is the compute the variant's own stages took (derive, distill, two "
        "evals) on this machine.", "",
        "| rank | variant | student | params | bpb init | bpb after KD | lambada ppl | mean acc init | "
        "mean acc after KD | retained | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(ranked, 1):
        lines.append(f"| {i} | `{r['variant']}` | {r['student']} | {r['params'] / 1e6:.1f}M | {r['bpb_init']:.3f} | "
                     f"{r['bpb']:.3f} | {r['lambada_ppl']:.3g} | {r['acc_mean_init']:.3f} | {r['acc_mean']:.3f} | "
                     f"{r['retained_mean']:.3f} | {r['minutes']:.1f} |")
    lines += ["", f"Teacher: held-out {best['bpb_teacher']:.3f} bits per byte, mean accuracy "
              f"{best['acc_mean_teacher']:.3f}.", "",
              f"Winner by held-out bits per byte after KD: `{best['variant']}` ({best['overrides']}).", ""]
    if any("NOT trained" in n for n in notes):
        lines += ["On this teacher every layer's experts are identical copies of one dense MLP, so `uniform`, "
                  "`frequency`, `select` at full width and `svd` at full rank all build this same student "
                  "(tests/test_expert_merge.py checks each reproduces the dense model exactly); what differs "
                  "here are the lossy options (a narrower FFN, a lower rank) and the choice of layers. A teacher "
                  "whose experts have specialised (PRESET=h100, issue 9) is where the merging methods part ways.",
                  ""]
    lines += ["Notes from the runs:", ""] + [f"- {n}" for n in notes] + [""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--teacher", default="smollm2-moe")
    ap.add_argument("--set", default="", help="overrides applied to every variant")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of: {', '.join(VARIANTS)}")
    ap.add_argument("--runs-dir", default=str(REPO_ROOT / "runs"))
    ap.add_argument("--out", default=str(REPO_ROOT / "docs/results/derivation_methods"))
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; available: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    runs = Path(args.runs_dir)
    # Any earlier run of the same preset (`make distill`) can lend its student-independent stages.
    seeds = [runs / run_name(load_config(args.preset, args.set, teacher=args.teacher, student="derived"))]
    rows = []
    notes: list[str] = []
    for name in names:
        # Latency depends on the architecture only, not on how its weights were derived: the params column
        # says which variants differ in size; `make distill` with the winner measures its speed.
        overrides = f"{args.set} {VARIANTS[name]} baseline.enabled=false latency.enabled=false".strip()
        cfg = load_config(args.preset, overrides, teacher=args.teacher, student="derived",
                          run_name=f"derive-{name}")
        dst = runs / run_name(cfg)
        for src in reversed(seeds):  # the latest run first: it ran with the current code
            seed_shared_stages(src, dst)
        print(f"\n=== derivation variant {name}: {VARIANTS[name]} ===", flush=True)
        rc = run_pipeline(cfg, runs)
        if rc:
            return rc
        seeds.append(dst)
        report = json.loads((dst / "report.json").read_text())
        rows.append(summarise(name, VARIANTS[name], report, dst))
        notes = notes or [n for n in report.get("notes", []) if "latency" not in n.lower()]
    cmd = "make compare-derivations" + (f" PRESET={args.preset}" if args.preset != "default" else "")
    write_study(rows, Path(args.out), cmd, args.preset, notes)
    print(f"\ncomparison: {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
