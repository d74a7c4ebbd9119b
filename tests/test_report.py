"""eval/report.py: a synthetic report renders to Markdown, self-contained HTML and PNGs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from core.number_format import num, pct, ratio, score_with_err, si_bytes, si_params  # noqa: E402
from eval.chance import TASK_CHOICES, chance_level  # noqa: E402
from eval.headline_metrics import headline_metrics  # noqa: E402
from eval.report import retained_gain, retained_value, write_report  # noqa: E402
from eval.report_plots import model_points  # noqa: E402
from tests.mlflow_store import fresh_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report() -> dict:
    return {
        "run": {"name": "olmoe-to-llama-smoke", "preset": "smoke", "created": "2026-11-23T20:00:00",
                "git_commit": "abc1234", "device": "cpu", "command": "python -m pipelines.run --preset smoke"},
        "teacher": {"name": "tiny-olmoe", "path": "/m/t", "params_total": 1_200_000_000,
                    "params_active": 300_000_000, "architecture": "OlmoeForCausalLM"},
        "student": {"name": "tiny-llama", "path": "/m/s", "params_total": 310_000_000,
                    "params_active": 310_000_000, "architecture": "LlamaForCausalLM", "init": "teacher layers"},
        "quality": {
            "arc_easy/acc": {"teacher": 0.60, "student_init": 0.30, "student": 0.54, "retained": 0.9,
                             "higher_is_better": True, "chance": 0.25,
                             "stderr": {"teacher": 0.01, "student_init": None, "student": "N/A"}},
            "wikitext/word_perplexity": {"teacher": 20.0, "student_init": 300.0, "student": 25.0,
                                         "retained": 0.8, "higher_is_better": False, "stderr": {}},
        },
        "latency": {
            "decode_b1": {"metric": "ms_per_token", "teacher": 30.0, "student": 10.0, "speedup": 3.0,
                          "path": "generate"},
            "prefill_b1_s64": {"metric": "tokens_per_s", "teacher": 100.0, "student": 250.0, "speedup": 2.5},
            "memory_weights": {"metric": "bytes", "teacher": 4.8e9, "student": 1.2e9, "speedup": 4.0},
        },
        "summary": {"retained_mean": 0.85, "speedup": 3.0, "speedup_setting": "decode_b1"},
        "cache": {"path": "/c", "tokens": 1_000_000, "k": 64, "bytes": 300_000_000, "bytes_per_token": 300.0},
        "training": {"steps": 100, "tokens": 409_600, "final_loss": 2.1, "final_kd": 1.5, "final_ce": 3.0,
                     "seconds": 120.0},
        "mlflow": {"experiment_id": "1", "parent_run_id": "deadbeef", "tracking_uri": "sqlite:///x.db"},
        "notes": ["the teacher's experts were not trained after upcycling"],
        "router": {"heatmaps": ["router/layer0.png"]},
        "curves": {"distill": {"loss": [[1, 3.0], [2, 2.5]], "kd": [[1, 2.0], [2, 1.6]], "ce": [[1, 4.0], [2, 3.4]]},
                   "baseline": {"loss": [[1, 4.0], [2, 3.6]]}},
    }


def test_write_report_full(tmp_path: Path) -> None:
    (tmp_path / "router").mkdir()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow([[0, 1], [1, 0]])
    fig.savefig(tmp_path / "router" / "layer0.png")
    plt.close(fig)

    out = write_report(_report(), tmp_path)
    assert set(out) == {"md", "html", "quality_vs_speedup", "quality_per_task", "training_curves"}
    for key in ("quality_vs_speedup", "quality_per_task", "training_curves"):
        assert out[key].read_bytes().startswith(PNG_MAGIC)

    md = out["md"].read_text()
    assert md.startswith("# Distillation report: olmoe-to-llama-smoke")
    summary = md.split("\n\n")[1]
    assert "tiny-olmoe" in summary and "tiny-llama" in summary and "85.0%" in summary and "3.00×" in summary
    assert "1.20B total / 300M active" in summary
    assert "the teacher's experts were not trained after upcycling" in md
    # Accuracies as percentages with their standard error in the same unit; 'N/A' stderr dropped; chance level.
    assert "| arc_easy/acc | ↑ | 25.0% | 60.0% ± 1.0% | 30.0% | 54.0% | 90.0% |" in md
    assert "| wikitext/word_perplexity | ↓ | — | 20.0 | 300 | 25.0 | 80.0% |" in md
    assert "| decode_b1 | ms_per_token | generate | 30.0 | stock | 10.0 | 3.00× |" in md  # ratios with two decimals
    assert "| memory_weights | bytes |  | 4.80 GB | stock | 1.20 GB | 4.00× |" in md  # bytes with SI prefixes
    assert "| /c | 1,000,000 | 64 | 300 MB | 300 B |" in md
    assert "deadbeef" in md and "python -m pipelines.run --preset smoke" in md
    assert "![layer0](router/layer0.png)" in md and "![quality per task](quality_per_task.png)" in md
    assert "![training curves](training_curves.png)" in md
    assert "(`arc_easy/acc`, `wikitext/word_perplexity`)" in md  # the headline metrics of the speedup plot

    page = out["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 4  # three plots and the heatmap, embedded
    assert "<table>" in page and "arc_easy/acc" in page and "<b>tiny-olmoe</b>" in page
    assert "src=\"quality" not in page  # nothing points to a file beside it


def test_write_report_minimal(tmp_path: Path) -> None:
    """Only the run block: no plots, no failure, and a missing heatmap is reported, not raised."""
    out = write_report({"run": {"name": "bare"}, "router": {"heatmaps": ["nope.png"]}}, tmp_path / "new")
    assert set(out) == {"md", "html"}
    assert "No retained-quality figure" in out["md"].read_text()
    assert "missing image: nope.png" in out["html"].read_text()


def test_heatmaps_link_relative_through_a_symlinked_run_folder(tmp_path: Path) -> None:
    """runs/ may be a link to another disk: the report still links its heatmaps relative to itself."""
    real = tmp_path / "disk" / "run"
    (real / "router").mkdir(parents=True)
    (real / "router" / "load.png").write_bytes(PNG_MAGIC)
    (tmp_path / "runs").symlink_to(tmp_path / "disk")
    linked = tmp_path / "runs" / "run"
    out = write_report({"run": {"name": "linked"}, "router": {"heatmaps": [str(linked / "router" / "load.png")]}},
                       linked)
    assert "![load](router/load.png)" in out["md"].read_text()


def test_retained_value() -> None:
    assert retained_value(0.5, 0.4, True) == pytest.approx(0.8)
    assert retained_value(10.0, 12.5, False) == pytest.approx(0.8)  # perplexity up 25% -> 80% kept
    assert retained_value(10.0, 8.0, False) == pytest.approx(1.25)  # student better than teacher
    assert math.isnan(retained_value(0.0, 0.3, True))
    assert math.isnan(retained_value(10.0, 0.0, False))


def test_retained_gain() -> None:
    assert retained_gain(0.6, 0.5, 0.4) == pytest.approx(0.5)  # half the teacher's edge over the baseline
    assert retained_gain(20.0, 25.0, 30.0, higher_is_better=False) == pytest.approx(0.5)  # same formula
    assert retained_gain(0.6, 0.3, 0.4) == pytest.approx(-0.5)  # distillation hurt
    assert math.isnan(retained_gain(0.4, 0.5, 0.4))  # no edge to recover
    assert math.isnan(retained_gain(0.625, 0.375, 0.75))  # the baseline beats the teacher: not 300%
    assert math.isnan(retained_gain(20.0, 25.0, 30.0))  # lower-is-better read as higher: no edge


def test_report_with_a_baseline_shows_it_and_the_gain(tmp_path: Path) -> None:
    report = _report()
    for row, base in zip(report["quality"].values(), (0.42, 40.0)):
        row["baseline"] = base
        row["retained_gain"] = retained_gain(row["teacher"], row["student"], base, row["higher_is_better"])
    report["summary"]["retained_gain_mean"] = 0.7
    md = write_report(report, tmp_path)["md"].read_text()
    assert "baseline (CE only)" in md and "retained gain" in md and "**70.0%** of the teacher's advantage" in md
    assert "| 54.0% | 42.0% | 90.0% |" in md  # the baseline's score, between the student's and retained


def test_number_formats() -> None:
    """One format per kind of number, the same in tables, plots and heatmaps."""
    assert pct(0.8504) == "85.0%" and pct(1.0) == "100.0%" and pct(None) == "—" and pct(math.nan) == "—"
    assert ratio(1.8462) == "1.85×" and ratio(3) == "3.00×" and ratio("N/A") == "—"
    assert num(4.3) == "4.30" and num(12.444) == "12.4" and num(0.0127) == "0.0127" and num(100.0) == "100"
    assert num(4538469.93) == "4,538,470" and num(999.96) == "1,000" and num(1024) == "1,024" and num(0.0) == "0"
    assert si_bytes(31.25) == "31.2 B" and si_bytes(4.8e9) == "4.80 GB" and si_bytes(999.7) == "1.00 kB"
    assert si_params(3_491_392) == "3.49M" and si_params(1.2e9) == "1.20B" and si_params(12_300) == "12.3K"
    assert score_with_err(0.25, 0.0433, "piqa/acc") == "25.0% ± 4.3%"
    assert score_with_err(12.44, 0.31, "heldout_text/byte_perplexity") == "12.4 ± 0.31"
    assert score_with_err(0.25, "N/A", "piqa/acc") == "25.0%"


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-eval's `!function module.name` tags as strings, importing nothing."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _task_yaml(path: Path) -> dict:
    """A task file with its `include` merged under it (lm-eval's rule: the including file wins)."""
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader) or {}
    if "include" in doc:
        doc = {**_task_yaml(path.parent / doc["include"]), **{k: v for k, v in doc.items() if k != "include"}}
    return doc


# Tasks whose answers are a data field or a function in their YAML: the count in their data.
DATA_CHOICES = {"arc_easy": 4, "arc_challenge": 4, "openbookqa": 4, "hellaswag": 4, "winogrande": 2}


def test_chance_table_matches_the_task_files() -> None:
    """eval/chance.py's table holds every multiple-choice task of eval/tasks with its number of answers: the
    length of a literal `doc_to_choice` list, else the count in the benchmark's data."""
    found = {}
    for path in sorted((Path(__file__).parents[1] / "eval" / "tasks").glob("local_*.yaml")):
        doc = _task_yaml(path)
        if doc.get("output_type") != "multiple_choice":
            continue
        name, spec = doc["task"].removeprefix("local_"), doc.get("doc_to_choice")
        literal = re.fullmatch(r"\s*\{\{\s*\[(.*)\]\s*\}\}\s*", spec) if isinstance(spec, str) else None
        if isinstance(spec, list):
            found[name] = len(spec)
        elif literal:
            found[name] = len([p for p in literal.group(1).split(",") if p.strip()])
        else:
            found[name] = DATA_CHOICES[name]  # a KeyError names a new task whose answer count is unknown
    assert found == TASK_CHOICES
    assert {"boolq", "mmlu", "piqa", "sciq"} <= set(found) - set(DATA_CHOICES)  # read from the files themselves


def test_chance_levels() -> None:
    """1 / number of answers for accuracies; none for perplexities, LAMBADA's exact word or unknown tasks."""
    assert chance_level("piqa/acc") == 0.5 and chance_level("hellaswag/acc_norm") == 0.25
    assert chance_level("arc_challenge/acc") == 0.25 and chance_level("winogrande/acc") == 0.5
    for key in ("lambada_openai/acc", "lambada_openai/perplexity", "heldout_text/bits_per_byte", "unknown/acc"):
        assert chance_level(key) is None


def test_headline_metrics_take_one_metric_per_task() -> None:
    keys = ["arc_easy/acc", "arc_easy/acc_norm", "heldout_text/word_perplexity", "heldout_text/bits_per_byte",
            "heldout_text/byte_perplexity", "lambada_openai/perplexity", "lambada_openai/acc", "x/odd"]
    assert headline_metrics(keys) == ["arc_easy/acc", "heldout_text/bits_per_byte", "lambada_openai/acc", "x/odd"]


def test_quality_vs_speedup_has_one_point_per_model() -> None:
    report = _report()
    q = report["quality"]
    q["arc_easy/acc"]["baseline"] = 0.48
    q["arc_easy/acc"]["stderr"] = {"teacher": 0.02, "student_init": 0.03, "student": 0.04, "baseline": None}
    q["arc_easy/acc_norm"] = {"teacher": 0.9, "student": 0.1, "higher_is_better": True}  # not a headline metric
    points = {p["role"]: p for p in model_points(report)}
    assert list(points) == ["teacher", "student_init", "baseline", "student"]
    assert points["teacher"]["speedup"] == 1.0 and points["student"]["speedup"] == 3.0
    assert points["baseline"]["speedup"] == 3.0 and points["student_init"]["speedup"] == 3.0
    assert points["teacher"]["retained"] == pytest.approx(1.0)
    # Mean over arc_easy/acc (0.54 / 0.60) and wikitext/word_perplexity (20 / 25).
    assert points["student"]["retained"] == pytest.approx((0.9 + 0.8) / 2)
    assert points["student_init"]["retained"] == pytest.approx((0.5 + 20 / 300) / 2)
    assert points["baseline"]["retained"] == pytest.approx(0.8)  # only arc_easy has a baseline score
    # Standard errors: arc_easy's alone (perplexity has none), through score / teacher, over 2 metrics.
    assert points["student"]["stderr"] == pytest.approx(0.04 / 0.60 / 2)
    assert points["teacher"]["stderr"] == pytest.approx(0.02 / 0.60 / 2)
    assert math.isnan(points["baseline"]["stderr"])
    del report["summary"]["speedup"]
    assert model_points(report) == []  # no speedup, no plot


def test_quality_vs_speedup_averages_only_the_counted_tasks() -> None:
    """With headline marks the plot's points average the counted tasks, as summary.retained_mean does; when
    none counts, every headline metric (and the plot's title says so)."""
    report = _report()
    q = report["quality"]
    q["arc_easy/acc"]["headline"] = {"counted": True, "reason": "counted"}
    q["wikitext/word_perplexity"]["headline"] = {"counted": False, "reason": "not counted: teacher worse than "
                                                                             "the baseline"}
    points = {p["role"]: p for p in model_points(report)}
    assert points["student"]["metrics"] == ["arc_easy/acc"] and points["student"]["retained"] == pytest.approx(0.9)
    q["arc_easy/acc"]["headline"] = {"counted": False, "reason": "not counted: teacher within 2 s.e. of chance"}
    points = {p["role"]: p for p in model_points(report)}
    assert points["student"]["retained"] == pytest.approx((0.9 + 0.8) / 2)


def test_curves_thinned_to_a_bounded_size() -> None:
    from pipelines.stages.report import _thin

    points = [[i, float(i)] for i in range(1, 2501)]
    thin = _thin(points, 1000)
    assert len(thin) <= 1001 and thin[0] == [1, 1.0] and thin[-1] == [2500, 2500.0]
    assert _thin(points[:10], 1000) == points[:10]


def test_training_curves_read_back_from_a_real_mlflow_store(tmp_path: Path) -> None:
    """The report stage reads the per-step losses the training stages logged, from the MLflow run its records
    name; a stage resumed at a later step and a run missing from the store are said in the notes."""
    import mlflow
    import torch

    from pipelines.context import RunContext
    from pipelines.stages.report import _training_curves

    mlflow.set_tracking_uri(fresh_store(tmp_path))
    # Its own experiment: an earlier test of the session may have left another store's experiment active.
    mlflow.set_experiment("curves")
    try:
        with mlflow.start_run() as run:
            for step in range(1, 4):
                mlflow.log_metrics({"train/loss": 3.0 - step / 10, "train/kd": 1.0, "train/ce": 4.0}, step=step)
        with mlflow.start_run() as resumed:
            for step in (5, 6):
                mlflow.log_metrics({"baseline_train/loss": 4.0 - step / 10}, step=step)
        ctx = RunContext(cfg=None, run_dir=tmp_path, device=torch.device("cpu"),
                         records={"distill": {"mlflow_run_id": run.info.run_id},
                                  "baseline": {"mlflow_run_id": resumed.info.run_id}})
        curves, notes = _training_curves(ctx)
        assert curves["distill"]["loss"] == [[1, pytest.approx(2.9)], [2, pytest.approx(2.8)],
                                             [3, pytest.approx(2.7)]]
        assert set(curves["distill"]) == {"loss", "kd", "ce"} and len(curves["baseline"]["loss"]) == 2
        assert len(notes) == 1 and "`baseline` start at step 5" in notes[0]

        ctx.records["distill"]["mlflow_run_id"] = "0" * 32
        curves, notes = _training_curves(ctx)
        assert "distill" not in curves and any("holds no per-step losses" in n for n in notes)
    finally:
        mlflow.set_tracking_uri(None)  # as tests/test_compare.py: later tests get the default store again


def test_the_teacher_against_its_dense_origin_on_held_out_text(tmp_path: Path) -> None:
    """The built-in teacher, as upcycled, computes its dense model exactly: the report says the held-out
    comparison before/after its continued training is the MoE teacher against that dense origin."""
    tune = {"training": {"steps": 240, "tokens": 7_864_320, "tokens_per_s": 44_000, "final_ce": 2.1, "final_aux": 2.0},
            "before": {"expert_spread": 0.0}, "after": {"expert_spread": 0.02}, "specialisation_by_source": {},
            "heldout": {"metric": "heldout_text/bits_per_byte", "before": 0.80, "after": 0.75,
                        "before_is_dense": "SmolLM2-135M-Instruct",
                        "after_minus_before": {"estimate": -0.05, "low": -0.06, "high": -0.04, "excludes_zero": True}}}
    md = write_report({"run": {"name": "r"}, "teacher_tune": tune}, tmp_path)["md"].read_text()
    assert ("0.800 before the continued training (the teacher as upcycled, which computes the dense "
            "SmolLM2-135M-Instruct exactly: this is the MoE teacher against its dense origin), 0.750 after "
            "(after minus before -0.0500, 95% interval [-0.0600, -0.0400])") in md


def test_latency_table_names_each_side_path_and_warns_of_a_host_difference(tmp_path: Path) -> None:
    row = {"metric": "ms_per_token", "teacher": 24.0, "student": 19.0, "speedup": 24 / 19, "path": "generate",
           "batch": 1, "length": 128, "teacher_implementation": "fused",
           "host_probe_us": {"teacher": 100.0, "student": 160.0}}
    best = {**row, "student": 6.0, "speedup": 4.0, "student_path": "static_compile",
            "host_probe_us": {"teacher": 100.0, "student": 105.0}}
    md = write_report({"run": {"name": "r"}, "latency": {"decode_b1": row, "decode_best_b1": best}},
                      tmp_path)["md"].read_text()
    assert "| decode_best_b1 | ms_per_token | generate / static_compile |" in md
    assert "Host conditions differed" in md and "(decode_b1)" in md and "1.60×" in md
    calm = {"decode_best_b1": best}
    assert "Host conditions differed" not in write_report({"run": {"name": "r"}, "latency": calm},
                                                          tmp_path / "calm")["md"].read_text()
