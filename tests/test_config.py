"""Presets, overrides and their errors."""
from __future__ import annotations

import pytest

from pipelines.config import ConfigError, available_presets, load_config, parse_overrides


def test_presets_load_and_smoke_inherits_default() -> None:
    assert {"default", "smoke", "ci"} <= set(available_presets())
    default, smoke = load_config("default"), load_config("smoke")
    assert smoke.teacher == default.teacher == "smollm2-moe"
    assert smoke.data.train_tokens < default.data.train_tokens
    assert smoke.preset == "smoke"


def test_overrides_are_typed() -> None:
    cfg = load_config("default", "distill.lr=1e-4 eval.limit=3 data.sources=wiki,news latency.enabled=false",
                      teacher="some/dir")
    assert cfg.distill.lr == 1e-4 and cfg.eval.limit == 3 and cfg.data.sources == ["wiki", "news"]
    assert cfg.latency.enabled is False and cfg.teacher == "some/dir"
    assert parse_overrides("a.b=1 c=x=y") == {"a": {"b": "1"}, "c": "x=y"}


@pytest.mark.parametrize("overrides,message", [
    ("distill.lrr=1", "unknown config key 'distill.lrr'; valid keys here: loss, kd_weight"),
    ("nope=1", "unknown config key 'nope'"),
    ("eval.limit=abc", "eval.limit: expected int"),
    ("eval.limit=2.5", "expected an integer"),
    ("latency.enabled=maybe", "expected true or false"),
    ("distill.lr=-1", "distill.lr must be > 0"),
    ("teacher_options.top_k=9", "top_k must be between 1"),
    ("distill.batch_size=6 distill.micro_batch_size=4", "multiple of distill.micro_batch_size"),
    ("distill=3", "is a section"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_say_what_is_valid(overrides: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("default", overrides)


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available presets: .*default"):
        load_config("nope")


def test_defaults_live_in_one_place():
    """configs/default.yaml sets no key: the sections' dataclasses hold the defaults, and `PRESET=default`
    is exactly them."""
    import dataclasses

    import yaml

    from pipelines.config import CONFIG_DIR, PipelineConfig

    assert not yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    assert dataclasses.asdict(load_config("default")) == dataclasses.asdict(PipelineConfig())


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/tmp/x", ".hidden", "a..b"])
def test_a_run_name_never_leaves_runs(name):
    with pytest.raises(ConfigError, match="is not a run name"):
        load_config("ci", run_name=name)
    assert load_config("ci", run_name="my-run_1.2").run_name == "my-run_1.2"


def test_a_stage_reading_an_undeclared_config_entry_fails_at_once(tmp_path):
    """Each stage sees only the config entries its table row lists (those its identity hashes)."""
    import torch

    from pipelines.context import RunContext
    from pipelines.stage_table import BY_NAME

    ctx = RunContext(cfg=load_config("ci"), run_dir=tmp_path, device=torch.device("cpu"))
    view = ctx.for_stage("distill", BY_NAME["distill"].config).cfg
    assert view.distill.lr > 0
    with pytest.raises(RuntimeError, match="reads config entry 'eval'.*stage_table.py"):
        view.eval
