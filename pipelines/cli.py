"""`moe-distill`: the command line. Each command is a thin front over the code `make` runs.

    moe-distill run --teacher smollm2-moe --student derived --preset ci --set "eval.limit=20"
    moe-distill run --plan ...                   which stages would run and why, without running them
    moe-distill eval runs/<run>/distill/model --tasks local_arc_easy,local_piqa --limit 50 --out runs/eval-x
    moe-distill compare                          quality against speedup for every run in the MLflow store
    moe-distill show-config --preset smoke --set "distill.lr=1e-4"   every key, its value and where it came from
    moe-distill sweep --preset smoke --trials 8  search the KD recipe (Optuna); writes the best as a preset
    moe-distill ab --preset smoke --variant otp "distill.on_policy_rate=0.25" ...   recipes side by side, with intervals
    moe-distill ui                               the MLflow UI on http://127.0.0.1:5000

`run` keeps the pipeline's exit codes (0 done, 2 cannot start or a command-line mistake, 3 fix the input named
on the `error (<kind>): ...` line, 75 time limit: run again, 130 interrupted), for scripts that act on them;
the other commands exit 3 on bad input too, with the same one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# As in pipelines.run: the hub is off unless the user says otherwise (HF_HUB_OFFLINE=0 moe-distill eval <hub id>).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from core.errors import UserError  # noqa: E402

PROG = "moe-distill"


class MissingToolError(UserError):
    """A program this command starts is not installed where expected."""

    kind = "install"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from eval.config import EvalConfig
    from pipelines.paths import RUNS_DIR
    from pipelines.sweep import SweepSettings

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="<command>")
    sub.add_parser("run", add_help=False, help="run the pipeline (the options of `make distill`; run --help)")
    defaults = EvalConfig()
    ev = sub.add_parser("eval", help="lm-eval tasks and latency on one model, no pipeline",
                        description="lm-eval tasks and latency of one model (a local folder or, with "
                        "HF_HUB_OFFLINE=0, a hub id), with the pipeline's own eval and latency code. Weights are "
                        "loaded from safetensors only.")
    ev.add_argument("model", help="a model folder (config.json, *.safetensors, tokenizer) or a hub id")
    ev.add_argument("--tasks", default=",".join(defaults.tasks),
                    help="comma-separated tasks or groups of eval/tasks (e.g. local_arc_easy, distill_quick, distill_full); "
                    "default: the pipeline's eval.tasks")
    ev.add_argument("--limit", type=int, default=defaults.limit, help="examples per task, 0: all (default %(default)s)")
    ev.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    ev.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    ev.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    ev.add_argument("--out", type=Path, default=None, help="folder to write eval_results.json to")
    ev.add_argument("--trust-remote-code", action="store_true",
                    help="allow the model's own Python code (auto_map in config.json); only for models you trust")
    cmp = sub.add_parser("compare", help="retained quality against speedup for every run (`make compare`)",
                         description="Pareto plot and table of retained quality against speedup for every pipeline "
                         "run in the MLflow store ($MLFLOW_TRACKING_URI); eval.compare.")
    cmp.add_argument("--out", type=Path, default=RUNS_DIR / "compare",
                     help="folder for pareto.png and compare.md (default %(default)s)")
    cmp.add_argument("--experiment", default=None, help="default: $MLFLOW_EXPERIMENT_NAME or distill")
    sc = sub.add_parser("show-config", help="the resolved configuration and where each value came from",
                        description="Every config key of a run with these options (as `moe-distill run` takes "
                        "them), its value, and its source: default, preset <name>, option or SET.")
    sc.add_argument("--preset", default="default", help="a preset name in configs/ or a path to a YAML file")
    sc.add_argument("--set", default="", help='space-separated key=value overrides, e.g. "distill.lr=1e-4"')
    sc.add_argument("--teacher", default="")
    sc.add_argument("--student", default="")
    sc.add_argument("--run-name", default="")
    sc.add_argument("--json", action="store_true", help="print {key: {value, source}} as JSON")
    sc.add_argument("--reference", action="store_true",
                    help="write docs/config.md (every key's type, default and meaning) and stop")
    sw = sub.add_parser("sweep", help="search the KD recipe with Optuna and write the best as a preset (`make sweep`)",
                        description="Run the pipeline up to its student and logit cache (reusing finished stages), "
                        "then N short trials over the KD knobs (pipelines/sweep_space.py: loss, temperature, "
                        "kd/ce weights, lr, ...), TPE-sampled with a fixed seed, each a nested MLflow run, scored "
                        "by the student's next-token cross-entropy on a slice of the training sequences that the "
                        "trials do not train on (the final evaluation never sees it either); bad trials are "
                        "pruned. Writes the best trial's values as a preset for `make distill PRESET=<file>`, and "
                        "trials.csv / trials.json.")
    sw.add_argument("--preset", default="default", help="a preset name in configs/ or a path to a YAML file")
    sw.add_argument("--set", default="", help='space-separated key=value overrides; a searched key set here is '
                    'held fixed, e.g. "distill.loss=forward_kl"')
    sw.add_argument("--data", default="", help="your own text, a file or folder (sets data.files)")
    sw.add_argument("--teacher", default="")
    sw.add_argument("--student", default="")
    sw.add_argument("--run-name", default="", help="run folder (default: the one `make distill` would use)")
    sw.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="default %(default)s")
    sweep_defaults = SweepSettings()
    sw.add_argument("--trials", type=int, default=sweep_defaults.trials, help="Optuna trials (default %(default)s)")
    sw.add_argument("--steps", type=int, default=0,
                    help="optimizer steps per trial (default: the preset's own distill steps)")
    sw.add_argument("--val-fraction", type=float, default=sweep_defaults.val_fraction,
                    help="share of the cached sequences held out of the trials' training to score them "
                    "(default %(default)s)")
    sw.add_argument("--seed", type=int, default=sweep_defaults.seed, help="the TPE sampler's seed (default %(default)s)")
    sw.add_argument("--out", type=Path, default=None,
                    help="the preset file to write (default: <run folder>/sweep/best.yaml)")
    ab = sub.add_parser("ab", help="KD recipes side by side at one budget, with intervals (`make ab`)",
                        description="Run the pipeline up to the student, logit cache, cross-entropy baseline and the "
                        "teacher's and baseline's evaluations (reusing finished stages), then distil and evaluate "
                        "each variant (the run's config plus its own distill.* settings: same student, data, "
                        "order and steps) in <run folder>/ab/<variant>/, and write ab.md / ab.json: each "
                        "variant's mean retained gain over the headline metrics with a paired bootstrap interval, "
                        "and its difference to the first variant with its interval.")
    ab.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "SETTINGS"),
                    help='a variant: a name and its distill.* settings as SET text ("distill.on_policy_rate=0.25") '
                    'or a preset file whose distill: section is taken (the sweep\'s best.yaml); "" is the run\'s own '
                    'settings. The first is the reference. Default: cache (the run\'s own), on_policy '
                    '(distill.on_policy_rate=0.25), layer_wise (distill.teacher_mode=online '
                    'distill.layer_weight=0.5; derived students)')
    ab.add_argument("--best", default="", help="a preset file from `make sweep` (its distill: section), compared "
                    "as variant sweep_best after the others")
    ab.add_argument("--preset", default="default", help="a preset name in configs/ or a path to a YAML file")
    ab.add_argument("--set", default="", help="space-separated key=value overrides for every variant")
    ab.add_argument("--data", default="", help="your own text, a file or folder (sets data.files)")
    ab.add_argument("--teacher", default="")
    ab.add_argument("--student", default="")
    ab.add_argument("--run-name", default="", help="run folder (default: the one `make distill` would use)")
    ab.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="default %(default)s")
    ab.add_argument("--time-limit", type=float, default=0,
                    help="seconds this invocation may take: it stops cleanly before (exit 75) and a rerun resumes")
    ui = sub.add_parser("ui", help="the MLflow UI (`make ui`)", description="mlflow ui on the project's store.")
    ui.add_argument("--port", type=int, default=5000, help="default %(default)s")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default %(default)s: this machine only; 0.0.0.0 exposes the store)")
    ui.add_argument("--backend-store-uri", default=None,
                    help="default: $MLFLOW_TRACKING_URI, else the repository's mlflow.db")
    return ap, sub.choices


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    ap, commands = _parser()
    if args and args[0] not in commands and args[0] not in ("-h", "--help"):
        print(f"error (usage): unknown command {args[0]!r}; commands: {', '.join(commands)} ({PROG} --help)",
              file=sys.stderr)
        return 2
    if not args or args[0] in ("-h", "--help"):
        ap.print_help()
        return 0 if args else 2
    if args[0] == "run":
        from pipelines import run

        return run.main(args[1:], prog=f"{PROG} run")
    opts = ap.parse_args(args)
    from core import interrupt

    try:
        with interrupt.remembered():
            return COMMANDS[opts.command](opts)
    except UserError as e:
        print(e.describe(), file=sys.stderr)
        return e.exit_code


def _eval(opts: argparse.Namespace) -> int:
    from pipelines import eval_one

    tasks = [t for t in opts.tasks.split(",") if t]
    return eval_one.main(opts.model, tasks, opts.limit, opts.batch_size, opts.device, not opts.no_latency,
                         opts.out, opts.trust_remote_code)


def _compare(opts: argparse.Namespace) -> int:
    from eval import compare

    return compare.main(["--out", str(opts.out)] + (["--experiment", opts.experiment] if opts.experiment else []))


def _show_config(opts: argparse.Namespace) -> int:
    if opts.reference:
        from pipelines.config_reference import write_reference

        print(f"wrote {write_reference()}")
        return 0
    from pipelines.config import config_sources

    sources = config_sources(opts.preset, opts.set, teacher=opts.teacher, student=opts.student,
                             run_name=opts.run_name)
    if opts.json:
        print(json.dumps({k: {"value": v, "source": s} for k, (v, s) in sources.items()}, indent=1))
        return 0
    rows = [(k, json.dumps(v), s) for k, (v, s) in sources.items()]
    kw, vw = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'key':<{kw}}  {'value':<{vw}}  source")
    for key, value, source in rows:
        print(f"{key:<{kw}}  {value:<{vw}}  {source}")
    return 0


def _ui(opts: argparse.Namespace) -> int:
    """Replace this process with the venv's `mlflow ui` (Ctrl-C and exit codes are then mlflow's own)."""
    from pipelines.tracking import tracking_uri

    mlflow = Path(sys.executable).parent / "mlflow"
    if not os.access(mlflow, os.X_OK):
        raise MissingToolError(f"{mlflow} is not there: install the project's environment first (make install)")
    uri = opts.backend_store_uri or tracking_uri()
    cmd = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", opts.host, "--port", str(opts.port)]
    print(f"MLflow UI on http://{opts.host}:{opts.port} ({uri})", flush=True)
    os.execvp(cmd[0], cmd)
    return 0  # not reached: execvp replaces the process


def _sweep(opts: argparse.Namespace) -> int:
    from pipelines import sweep

    settings = sweep.SweepSettings(trials=opts.trials, steps=opts.steps, val_fraction=opts.val_fraction,
                                   seed=opts.seed, out=opts.out)
    return sweep.main(opts.preset, opts.set, opts.data, opts.teacher, opts.student, opts.run_name, opts.runs_dir,
                      settings)


def _ab(opts: argparse.Namespace) -> int:
    from pipelines import ab

    return ab.main(opts.preset, opts.set, opts.data, opts.teacher, opts.student, opts.run_name, opts.runs_dir,
                   [tuple(v) for v in opts.variant], opts.best, opts.time_limit)


COMMANDS = {"eval": _eval, "compare": _compare, "show-config": _show_config, "sweep": _sweep, "ab": _ab, "ui": _ui}


def entry() -> None:
    """Console-script entry: Ctrl-C during imports is still one line and exit 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `moe-distill show-config | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would flush into it at exit
        sys.exit(1)
