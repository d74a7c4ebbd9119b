"""Pipeline configuration: typed sections, YAML presets in `configs/`, and `key=value` overrides.

A preset is a YAML file `configs/<name>.yaml`; it may name a `base:` preset whose values it overrides.
Command-line overrides (`SET="distill.lr=1e-4 eval.limit=20"`) are applied last. Every key is checked
against the dataclasses below, so a typo fails at once with the list of valid keys instead of being
silently ignored hours into a run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from core.errors import ConfigError, require
from distill.config import DistillConfig
from eval.config import EvalConfig, LatencyConfig
from pipelines.paths import CONFIG_DIR, REPO_ROOT
from resources.config import DataConfig
from students.config import StudentConfig
from teachers.config import LogitsConfig, TeacherConfig, TeacherTuneConfig

DEVICES = ("auto", "cpu", "cuda")

__all__ = ["ConfigError", "PipelineConfig", "load_config", "parse_overrides", "available_presets", "REPO_ROOT",
           "DistillConfig", "EvalConfig", "LatencyConfig", "DataConfig", "StudentConfig", "LogitsConfig",
           "TeacherConfig", "TeacherTuneConfig", "BaselineConfig"]


@dataclass
class BaselineConfig:
    # Also train the same student from the same initialisation on plain cross-entropy, same tokens and
    # steps: the report then shows `baseline` and `retained_gain` = (student - baseline) / (teacher - baseline).
    enabled: bool = False

    def validate(self) -> None:
        pass


@dataclass
class PipelineConfig:
    teacher: str = "smollm2-moe"  # "smollm2-moe", a folder, or a hub id
    student: str = "derived"  # "derived", a folder, or a hub id
    preset: str = "default"
    run_name: str = ""  # empty: derived from teacher, student and preset
    device: str = "auto"  # "auto", "cpu", "cuda"
    overrides: str = ""  # the SET text this config was built with (recorded so the report can repeat the run)
    teacher_options: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_tune: TeacherTuneConfig = field(default_factory=TeacherTuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    student_options: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Content hash of the named top-level entries: what a stage's output depends on."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check (and for strings from the command line, parse) `value` against the annotation `typ`."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[]") for v in value]
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = typ(value) if not isinstance(value, str) else typ(float(value)) if typ is int else typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and float(value) != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; set its keys as {full}.<key>=...")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _load_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(available_presets())}")
    if name in seen:
        raise ConfigError(f"preset '{name}' inherits from itself via {' -> '.join(seen)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _load_preset(base, seen + (name,))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_overrides(text: str) -> dict[str, Any]:
    """`"a.b=1 c=x"` -> `{"a": {"b": "1"}, "c": "x"}` (values stay strings; typing happens in `_apply`)."""
    out: dict[str, Any] = {}
    for item in text.split():
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def validate(cfg: PipelineConfig) -> None:
    """Each section checks its own rules (its `validate`, next to its definition); the top level checks the rest."""
    require(cfg.device in DEVICES, f"device must be one of {', '.join(DEVICES)}")
    # A run name is one folder under runs/: never a path that leaves it (RUN=.. would make the checkout the run).
    require(not cfg.run_name or (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.run_name) is not None
                                 and ".." not in cfg.run_name),
            f"RUN={cfg.run_name!r} is not a run name: use letters, digits, '_', '-' and '.', one folder under "
            "runs/ (no '/', no '..')")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.validate()


def load_config(preset: str = "default", overrides: str | dict[str, Any] = "", **top: str) -> PipelineConfig:
    """Build the config from a preset, then top-level values (teacher=, student=), then SET overrides."""
    cfg = PipelineConfig()
    _apply(cfg, _load_preset(preset))
    cfg.preset = preset
    _apply(cfg, {k: v for k, v in top.items() if v})
    _apply(cfg, parse_overrides(overrides) if isinstance(overrides, str) else overrides)
    cfg.overrides = overrides if isinstance(overrides, str) else " ".join(
        f"{k}={v}" for k, v in _flat(overrides).items())
    validate(cfg)
    return cfg
