"""eval/report.py: a synthetic report renders to Markdown, self-contained HTML and PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from eval.report import retained_gain, retained_value, write_report  # noqa: E402

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
                             "higher_is_better": True,
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
    }


def test_write_report_full(tmp_path: Path) -> None:
    (tmp_path / "router").mkdir()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow([[0, 1], [1, 0]])
    fig.savefig(tmp_path / "router" / "layer0.png")
    plt.close(fig)

    out = write_report(_report(), tmp_path)
    assert set(out) == {"md", "html", "quality_vs_speedup", "quality_per_task"}
    for key in ("quality_vs_speedup", "quality_per_task"):
        assert out[key].read_bytes().startswith(PNG_MAGIC)

    md = out["md"].read_text()
    assert md.startswith("# Distillation report: olmoe-to-llama-smoke")
    summary = md.split("\n\n")[1]
    assert "tiny-olmoe" in summary and "tiny-llama" in summary and "85.0%" in summary and "3.00×" in summary
    assert "1.2B total / 300M active" in summary
    assert "the teacher's experts were not trained after upcycling" in md
    assert "| arc_easy/acc | ↑ | 0.6 ± 0.01 | 0.3 | 0.54 | 90.0% |" in md  # 'N/A' stderr dropped
    assert "| wikitext/word_perplexity | ↓ | 20 | 300 | 25 | 80.0% |" in md
    assert "| decode_b1 | ms_per_token | generate | 30 | 10 | 3× |" in md
    assert "4.47 GiB" in md  # bytes rows are shown human-readable
    assert "| /c | 1,000,000 | 64 | 286 MiB | 300 |" in md
    assert "deadbeef" in md and "python -m pipelines.run --preset smoke" in md
    assert "![layer0](router/layer0.png)" in md and "![quality per task](quality_per_task.png)" in md

    page = out["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 3  # two plots and the heatmap, embedded
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
    assert "0.42" in md  # the baseline's score
