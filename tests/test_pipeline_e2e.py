"""The whole pipeline on a tiny random Mixtral teacher (SmolLM2's real tokenizer) and a little real text.

Checks what a user relies on: the MLflow parent run with one nested run per stage, finite report numbers,
the files in the run folder, and that a rerun reuses every stage.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.mlflow_store import fresh_store

pytestmark = pytest.mark.slow


def _refuse_constant(token: str) -> None:
    raise AssertionError(f"report.json holds the non-standard JSON constant {token}")


def test_pipeline_end_to_end(tiny_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from kernels import kd_loss
    from pipelines.config import load_config
    from pipelines.run import run_pipeline
    from pipelines.stage_table import STAGES

    uri = fresh_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "e2e-experiment")  # honoured, as by MLflow's own clients
    # Long stages record system metrics; the tiny run's stages last seconds, so sample often enough to see them.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    # The CPU pipeline runs the loss's row operations in PyTorch (as `make distill` on CPU does); their Triton
    # versions are tested through the interpreter in test_fused_linear_kd.py, and are far too slow there.
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)
    cfg = load_config("ci", teacher=str(tiny_moe_dir), student="derived", run_name="e2e")
    runs = tmp_path / "runs"
    assert run_pipeline(cfg, runs) == 0

    run_dir = runs / "e2e"
    # Strict JSON (no bare NaN, which the standard lacks): any reader can parse it.
    report = json.loads((run_dir / "report.json").read_text(), parse_constant=_refuse_constant)
    for f in ("report.md", "report.html", "quality_vs_speedup.png"):
        assert (run_dir / f).is_file(), f
    assert report["teacher"]["params_active"] < report["teacher"]["params_total"]
    assert report["student"]["params_total"] < report["teacher"]["params_active"]
    assert report["cache"]["tokens"] == 1024 and report["cache"]["k"] == 8 and report["cache"]["bytes"] > 0
    assert report["quality"], "no quality metrics"
    for key, row in report["quality"].items():
        for who in ("teacher", "student_init", "student"):
            assert math.isfinite(row[who]), (key, who, row)
        if row["teacher"] != 0:  # a random model can score 0 on 4 examples; retained is then undefined
            assert math.isfinite(row["retained"]), (key, row)
    assert "heldout_text/bits_per_byte" in report["quality"]
    assert "arc_easy/acc" in report["quality"]
    for key, row in report["latency"].items():
        assert math.isfinite(row["speedup"]) and row["speedup"] > 0, (key, row)
    assert math.isfinite(report["training"]["final_loss"])
    # The ci preset also trains the CE-only baseline: every quality row carries it and the retained gain.
    for key, row in report["quality"].items():
        assert math.isfinite(row["baseline"]) and "retained_gain" in row, (key, row)
    assert "retained_gain_mean" in report["summary"]
    # Router analytics from the logits stage: every token counted once per chosen expert, heatmaps drawn.
    router = report["router"]
    assert router["layers"] == [0, 1, 2, 3] and router["sequences"] == 16
    assert all(sum(row) == 1024 * 2 for row in router["tokens_per_expert"])
    assert [Path(h).name for h in router["heatmaps"]] == ["router_load.png", "router_sources.png"]
    assert "Router usage (teacher)" in (run_dir / "report.md").read_text()
    # The ci preset trains the teacher two steps further first; the report shows its routing before/after.
    tune = report["teacher_tune"]
    assert tune["training"]["steps"] == 2 and math.isfinite(tune["training"]["final_ce"])
    assert tune["before"]["expert_spread"] > 0 and tune["after"]["routing_entropy"] > 0
    assert "Teacher's continued training" in (run_dir / "report.md").read_text()
    # ... and what it bought on held-out text: the teacher before (eval_teacher_before) against after, paired.
    held = tune["heldout"]
    assert held["after"] == report["quality"]["heldout_text/bits_per_byte"]["teacher"]
    assert math.isfinite(held["before"]) and held["before"] != held["after"]
    d = held["after_minus_before"]
    assert d["estimate"] == pytest.approx(held["after"] - held["before"]) and d["low"] <= d["estimate"] <= d["high"]
    assert "bits per byte (lower is better)" in (run_dir / "report.md").read_text()
    assert report["teacher"]["path"].endswith("teacher_tune/model")

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e-experiment")
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.tags["stage"] == "pipeline" and parent.data.tags["teacher"] == str(tiny_moe_dir)
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == {s.name for s in STAGES}
    logits_run = next(c for c in children if c.data.tags["stage"] == "logits")
    assert {f.path for f in client.list_artifacts(logits_run.info.run_id, "router")} >= {
        "router/router_load.png", "router/router_sources.png", "router/router_stats.json"}
    assert "router/load_cv" in logits_run.data.metrics
    distill = next(c for c in children if c.data.tags["stage"] == "distill")
    history = client.get_metric_history(distill.info.run_id, "train/loss")
    assert len(history) == report["training"]["steps"] and all(math.isfinite(m.value) for m in history)
    assert client.search_logged_models(experiment_ids=[exp.experiment_id]), "the distilled student was not logged as a model"
    assert "report.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # MLflow as its users expect: the training data and eval sets as datasets, system metrics on long stages,
    # the student in the Model Registry with its evaluation numbers and the runs that made it.
    inputs = {(i.dataset.name, next(t.value for t in i.tags if t.key == "mlflow.data.context"))
              for i in client.get_run(distill.info.run_id).inputs.dataset_inputs}
    assert ("training sequences (16 x 64 tokens)", "training") in inputs
    eval_run = next(c for c in children if c.data.tags["stage"] == "eval_student")
    eval_inputs = {i.dataset.name for i in client.get_run(eval_run.info.run_id).inputs.dataset_inputs}
    assert {"local_arc_easy (4 examples)", "held-out text"} <= eval_inputs
    assert any(k.startswith("system/") for k in client.get_run(distill.info.run_id).data.metrics)
    versions = client.search_model_versions("name='moe-distill-e2e'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["pipeline_run_id"] == parent.info.run_id and tags["distill_run_id"] == distill.info.run_id
    assert "eval/arc_easy/acc" in tags and "summary/speedup" in tags

    # A rerun with nothing changed reuses every stage and makes a new parent run.
    assert run_pipeline(cfg, runs) == 0
    report2 = json.loads((run_dir / "report.json").read_text())
    assert report2["mlflow"]["parent_run_id"] != parent.info.run_id
    children2 = client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.mlflow.parentRunId = '{report2['mlflow']['parent_run_id']}'")
    assert {c.data.tags["skipped"] for c in children2} == {"true"}
    # Reused stages are light runs pointing at the runs that produced them, not copies of their numbers.
    reused = next(c for c in children2 if c.data.tags["stage"] == "distill")
    assert reused.data.tags["produced_by_run_id"] == distill.info.run_id and not reused.data.metrics
    assert len(client.search_model_versions("name='moe-distill-e2e'")) == 1  # the same student: no new version
    assert report2["quality"] == report["quality"]

    # LoRA adapters, an online teacher and hidden-state alignment: only the distill stage and what depends on
    # it run again, and what leaves the stage is a plain dense model with the adapters merged in.
    # The student is also derived differently (experts weighted by measured routing mass), so it reruns too.
    # Its evaluation before distillation is switched off: that stage is left out, and the switch reruns no other
    # evaluation (it is not part of their identity).
    lora = load_config("ci", "distill.lora_rank=4 distill.teacher_mode=online distill.hidden_weight=0.1 "
                       "distill.layer_weight=0.1 distill.layer_loss=cosine student_options.method=frequency "
                       "eval.student_init=false",
                       teacher=str(tiny_moe_dir), student="derived", run_name="e2e")
    assert run_pipeline(lora, runs) == 0
    report3 = json.loads((run_dir / "report.json").read_text())
    children3 = {c.data.tags["stage"]: c for c in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{report3['mlflow']['parent_run_id']}'")}
    assert children3["distill"].data.tags["skipped"] == "false"
    assert children3["logits"].data.tags["skipped"] == "true"
    assert children3["student"].data.tags["skipped"] == "false"
    assert children3["eval_teacher"].data.tags["skipped"] == "true" and "eval_student_init" not in children3
    assert all(row.get("student_init") is None for row in report3["quality"].values())
    assert all(math.isfinite(row["student"]) for row in report3["quality"].values())
    assert report3["student"]["name"].startswith("derived(frequency")
    hidden = client.get_metric_history(children3["distill"].info.run_id, "train/hidden")
    assert len(hidden) == report3["training"]["steps"] and all(math.isfinite(m.value) for m in hidden)
    # Layer-wise transfer: each kept student layer against the teacher layer it was derived from.
    layers = client.get_metric_history(children3["distill"].info.run_id, "train/layers")
    assert len(layers) == report3["training"]["steps"] and all(0 <= m.value < 2 for m in layers)
    from safetensors import safe_open

    with safe_open(str(run_dir / "distill" / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
