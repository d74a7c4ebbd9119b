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
