"""`moe-distill sweep`: the search space table, the validation split, and a real sweep on the ci preset with a
tiny Mixtral teacher (2 trials, one pruned by a pruner that always prunes it), its MLflow runs and its preset."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from core.errors import ConfigError
from tests.mlflow_store import fresh_store

# What the sweep claims to search (README, "Searching for a recipe"): one row each, no more.
CLAIMED_KNOBS = {"distill.loss", "distill.beta", "distill.alpha", "distill.temperature", "distill.kd_weight",
                 "distill.ce_weight", "distill.lr", "distill.warmup_steps", "distill.hidden_weight",
                 "distill.on_policy_rate", "distill.on_policy_loss", "distill.layer_weight"}


def test_search_space_has_one_row_per_claimed_knob_and_every_value_is_valid() -> None:
    from pipelines.config import PipelineConfig
    from pipelines.sweep_space import SEARCH_SPACE, Choice, Knob, check_space

    assert set(SEARCH_SPACE) == CLAIMED_KNOBS
    check_space(SEARCH_SPACE, PipelineConfig())
    with pytest.raises(ConfigError, match="distill.not_a_knob"):
        check_space({"distill.not_a_knob": Knob(Choice((1,)))}, PipelineConfig())
    # Both ends of every range (every choice) pass DistillConfig's own rules, with the row's condition met.
    for key, knob in SEARCH_SPACE.items():
        for value in knob.dist.extremes():
            full = PipelineConfig()
            for name, values in knob.conditions:
                *parents, leaf = name.split(".")
                setattr(getattr(full, parents[0]) if parents else full, leaf, values[0])
            cfg = dataclasses.replace(full.distill, **{key.split(".", 1)[1]: value})
            cfg.validate(processes=1)


def test_conditional_rows_are_sampled_only_when_they_apply() -> None:
    import optuna

    from pipelines.config import PipelineConfig
    from pipelines.sweep_space import sample

    base = PipelineConfig().to_dict()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        values = sample(study.ask(), base, fixed=frozenset({"distill.lr"}))
        seen.append(values["distill.loss"])
        assert "distill.lr" not in values and "distill.hidden_weight" not in values  # fixed; cache mode
        assert ("distill.beta" in values) == (values["distill.loss"] == "jsd")
        assert ("distill.alpha" in values) == (values["distill.loss"] in ("skew_kl", "skew_reverse_kl"))
    assert len(set(seen)) > 3
    # The rows that need the teacher in the loop: only with teacher_mode=online; layer_weight only for a
    # derived student (both conditions of its row).
    base["distill"]["teacher_mode"] = "online"
    values = sample(study.ask(), base)
    assert {"distill.on_policy_rate", "distill.on_policy_loss", "distill.layer_weight"} <= set(values)
    base["student"] = "some/dense-model"
    values = sample(study.ask(), base)
    assert "distill.on_policy_rate" in values and "distill.layer_weight" not in values


def test_split_holds_out_the_last_sequences() -> None:
    from pipelines.sweep import split_sequences

    train, val = split_sequences(16, 0.25, 2)
    assert val == [12, 13, 14, 15] and train == list(range(12))
    assert split_sequences(8, 0.01, 4)[1] == [7]  # at least one
    # teacher-written sequences (after the corpus) always train; validation is the end of the corpus
    assert split_sequences(20, 0.25, 2, corpus=16) == (list(range(12)) + [16, 17, 18, 19], [12, 13, 14, 15])
    with pytest.raises(ConfigError, match="distill.batch_size=4"):
        split_sequences(8, 0.75, 4)


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "error (config): --trials must be >= 1"),
    (["--out", "best.txt"], "error (config): --out best.txt: a preset is a YAML file"),
    (["--preset", "nope"], "error (config): unknown preset 'nope'"),
    (["--set", "distill.lrr=1"], "error (config): unknown config key 'distill.lrr'"),
])
def test_bad_input_is_one_line_and_exit_3(args: list[str], message: str, capsys: pytest.CaptureFixture,
                                          tmp_path: Path) -> None:
    from pipelines.cli import main

    assert main(["sweep", "--preset", "ci", "--runs-dir", str(tmp_path), *args]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_sweep_on_ci_preset(tiny_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import optuna

    from kernels import kd_loss
    from logit_cache import LogitCache
    from pipelines.config import load_config
    from pipelines.sweep import SCORE, SweepSettings, run_sweep

    uri = fresh_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-test")
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)  # as the CPU pipeline runs it (test_pipeline_e2e.py)

    class PruneTrialOne(optuna.pruners.BasePruner):
        """Prunes trial 1 at its first report: a real Optuna pruner whose verdict is known in advance."""

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return trial.number == 1

    cfg = load_config("ci", "teacher_tune.steps=0 baseline.enabled=false latency.enabled=false eval.limit=2",
                      teacher=str(tiny_moe_dir), student="derived", run_name="sweep-ci")
    out = tmp_path / "presets" / "best.yaml"
    result = run_sweep(cfg, tmp_path / "runs", SweepSettings(trials=2, steps=3, out=out), pruner=PruneTrialOne())

    # Trial 0 finished, trial 1 was pruned at its first scored step; the table says so.
    states = {t.number: t.state for t in result.trials}
    assert states == {0: "complete", 1: "pruned"}
    pruned = result.trials[1]
    assert pruned.steps == 1 and "pruned at step 1" in pruned.note
    rows = list(csv.DictReader(result.table.open()))
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "complete"), ("1", "pruned")]
    assert json.loads(result.table.with_suffix(".json").read_text())[0]["values"] == result.trials[0].values

    # The written preset loads and carries the best trial's values on the preset the sweep ran on.
    best = result.best
    assert best.number == 0 and result.preset == out
    loaded = load_config(str(out), teacher=str(tiny_moe_dir))
    for key, value in best.values.items():
        assert getattr(loaded.distill, key.split(".", 1)[1]) == value, key
    assert loaded.data.train_tokens == 1024 and loaded.teacher_tune.steps == 0  # ci, and the sweep's SET
    assert f"PRESET={out}" in result.command and "make distill" in result.command

    # The validation slice: the last quarter of the cached sequences, none of them among the training ones.
    run_dir = tmp_path / "runs" / "sweep-ci"
    split = json.loads((run_dir / "sweep" / "split.json").read_text())
    train, val = split["training_sequences"], split["validation_sequences"]
    assert split["sequences"] == 16 and val == list(range(12, 16)) and train == list(range(12))
    cache = LogitCache(run_dir / "logits" / "cache")
    train_texts = {tuple(cache[i]["input_ids"].tolist()) for i in train}
    assert not train_texts & {tuple(cache[i]["input_ids"].tolist()) for i in val}

    # MLflow: one sweep parent run; under it the stages it ran and one run per trial with its params and scores.
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["stage"] == "sweep" and parent.data.metrics["sweep/best_score"] == best.score
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} >= {"teacher", "data", "logits", "student", "sweep_trial"}
    assert "distill" not in {c.data.tags["stage"] for c in children}
    trials = {int(c.data.tags["trial"]): c for c in children if c.data.tags["stage"] == "sweep_trial"}
    assert sorted(trials) == [0, 1]
    for t in result.trials:
        run = trials[t.number]
        assert run.data.tags["trial_state"] == t.state
        assert {k: run.data.params[k] for k in t.values} == {k: str(v) for k, v in t.values.items()}
        history = client.get_metric_history(run.info.run_id, SCORE)
        assert [m.step for m in history] == ([1, 2, 3] if t.state == "complete" else [1])
    assert trials[0].data.metrics["val/score"] == pytest.approx(best.score)

    # A second sweep reuses every stage (same run folder as `make distill` of this configuration).
    again = run_sweep(cfg, tmp_path / "runs", SweepSettings(trials=1, steps=1), pruner=PruneTrialOne())
    reruns = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{again.parent_run_id}'")
    assert all(c.data.tags.get("skipped") == "true" for c in reruns if c.data.tags["stage"] != "sweep_trial")
    assert again.preset == run_dir / "sweep" / "best.yaml" and again.preset.is_file()
