"""Pipeline configuration: typed sections, YAML presets in `configs/`, and `key=value` overrides.

A preset is a YAML file, `configs/<name>.yaml` by name (`smoke`) or any file by path (`path/to/my.yaml`); it may
name a `base:` preset (a name, or a path relative to the file) whose values it overrides.
Command-line overrides (`SET="distill.lr=1e-4 eval.limit=20"`) are applied last. Every key is checked
against the dataclasses below, so a typo fails at once with the list of valid keys instead of being
silently ignored hours into a run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
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

__all__ = ["ConfigError", "PipelineConfig", "load_config", "parse_overrides", "available_presets", "config_sources",
           "REPO_ROOT",
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
    # More students beside the main one, on the same teacher, data and logit cache: {name: the settings in
    # which it differs, `student` and `student_options.*` only}. Each gets its own student, distill, baseline,
    # evaluation and latency stages under runs/<run>/students/<name>/, and the report compares them all
    # (`student_variants`; YAML `students: {s24: {student_options: {keep_layers: top_24}}}`, or
    # SET="students.s24.student_options.keep_layers=top_24").
    students: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Content hash of the named top-level entries: what a stage's output depends on. A section's fields
        marked `metadata={"identity": False}` (switches that decide whether another stage runs) are left out,
        so turning one does not rerun the stages that read the rest of that section."""
        d = self.to_dict()
        for n in names:
            section = getattr(self, n)
            if dataclasses.is_dataclass(section):
                for f in dataclasses.fields(section):
                    if f.metadata.get("identity", True) is False:
                        d[n].pop(f.name, None)
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


def apply_values(cfg: Any, updates: dict[str, Any]) -> None:
    """Set nested {section: {key: value}} values on a config in place, typed and checked as SET values are
    (an unknown key raises ConfigError); `validate` is the caller's to run afterwards."""
    _apply(cfg, updates)


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(valid)}")
        current = getattr(obj, key)
        if isinstance(current, dict):
            setattr(obj, key, _merged_mapping(current, value, full))
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; set its keys as {full}.<key>=...")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _merged_mapping(current: dict[str, Any], value: Any, key: str) -> dict[str, Any]:
    """A mapping entry (`students`) updated key by key, so a SET adds to a preset's entries instead of replacing
    them; `{}` (YAML or SET text) empties it. The values are checked where they are used (`student_variants`)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' is a mapping: set its entries as {key}.<name>.<key>=..., or {key}={{}} to empty it")
    if not value:
        return {}
    merged = copy.deepcopy(current)
    _deep_update(merged, value)
    return merged


def is_preset_path(preset: str) -> bool:
    """A preset given as a file (`my.yaml`, `dir/x`) rather than a name in configs/ (`smoke`)."""
    return preset.endswith((".yaml", ".yml")) or "/" in preset or os.sep in preset


def _preset_file(name: str, referrer: Path | None) -> Path:
    """The YAML file of preset `name`: a built-in name (`smoke`: configs/smoke.yaml) or a path to any YAML file
    (`my.yaml`, `dir/my.yaml`), relative to the folder of `referrer` (the file whose `base:` names it), else to
    the working directory."""
    if not is_preset_path(name):
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{name}'{_named_by(referrer)}; available presets: "
                              f"{', '.join(available_presets())} (or a path to a YAML file, e.g. "
                              "PRESET=path/to/my.yaml)")
        return path
    path = Path(name).expanduser()
    if not path.is_absolute() and referrer is not None:
        path = referrer.parent / path
    if not path.is_file():
        where = "" if str(path.resolve()) == name else f" ({path.resolve()})"
        raise ConfigError(f"preset file '{name}'{_named_by(referrer)} does not exist{where}; pass an existing "
                          f"YAML file or one of the presets: {', '.join(available_presets())}")
    return path


def _named_by(referrer: Path | None) -> str:
    return "" if referrer is None else f" (the base: of {os.path.normpath(referrer)})"


def _preset_layers(name: str, referrer: Path | None = None,
                   seen: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The preset `name` and its `base:` chain as [(name, its own keys)], the root base first: merged in this
    order they give the preset's values; each layer names where a key came from (`config_sources`).
    `referrer`: the file whose `base:` is `name`; `seen`: the (resolved file, name) pairs that led here, to
    refuse a circle."""
    path = _preset_file(name, referrer)
    if referrer is not None and is_preset_path(name):
        name = os.path.normpath(path)  # a base named relative to its file: say which file it is
    ident = str(path.resolve())
    if ident in (i for i, _ in seen):
        raise ConfigError(f"preset '{name}' inherits from itself via {' -> '.join(n for _, n in seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"preset file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    base = data.pop("base", None)
    if base is None:
        return [(name, data)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: must name a preset or a YAML file, got {base!r}")
    # A built-in preset's base is another built-in name; a file's base may also be a path next to it.
    return _preset_layers(base, path, seen + ((ident, name),)) + [(name, data)]


def _load_preset(name: str) -> dict[str, Any]:
    """The preset's values, its `base:` chain merged (a later preset's keys override its base's)."""
    merged: dict[str, Any] = {}
    for _, data in _preset_layers(name):
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
    _check_lengths(cfg)
    student_variants(cfg)


# What may differ between the students of one run: which model and how it is built. Everything else (data,
# teacher, distillation recipe and budget, evaluation) is shared, so that their comparison is at equal tokens.
STUDENT_KEYS = ("student", "student_options")
NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


def student_variants(cfg: PipelineConfig) -> list[tuple[str, PipelineConfig]]:
    """The run's extra students (`students:`), each as the full config it runs with: the run's own with the
    student's settings applied and no further students. Raises ConfigError naming the student and what is wrong
    (a bad name, a setting other than STUDENT_KEYS, a bad value, or the same student twice)."""
    out: list[tuple[str, PipelineConfig]] = []
    seen = {json.dumps([cfg.student, dataclasses.asdict(cfg.student_options)], sort_keys=True): "the main student"}
    for name, spec in cfg.students.items():
        require(re.fullmatch(NAME_RULE, str(name)) is not None and ".." not in str(name) and name != "main",
                f"students.{name}: a student's name is one folder under students/: letters, digits, '_', '-' and "
                "'.', not 'main' (the main student's name in the report)")
        require(isinstance(spec, dict) and bool(spec),
                f"students.{name}: give the settings in which this student differs, e.g. "
                f"students.{name}.student_options.keep_layers=top_24")
        other = sorted(set(spec) - set(STUDENT_KEYS))
        require(not other, f"students.{name}: only {' and '.join(STUDENT_KEYS)}.* may differ between the students "
                           f"of a run (got {', '.join(other)}); the rest is shared so they compare at equal tokens. "
                           "Set it for all of them, or start another run")
        variant = copy.deepcopy(cfg)
        variant.students = {}
        try:
            _apply(variant, spec)
            variant.student_options.validate()
        except ConfigError as e:
            raise ConfigError(f"students.{name}: {e}") from None
        ident = json.dumps([variant.student, dataclasses.asdict(variant.student_options)], sort_keys=True)
        require(ident not in seen, f"students.{name} is the same student as {seen.get(ident)}: give it a "
                                   "setting that differs, or remove it")
        seen[ident] = f"students.{name}"
        out.append((str(name), variant))
    return out


def _check_lengths(cfg: PipelineConfig) -> None:
    """The rules that join two sections: prompts and samples fit the data.seq_len tokens of a training sequence."""
    from distill.on_policy import split_lengths

    seq = cfg.data.seq_len
    if cfg.distill.on_policy_rate > 0:
        try:
            split_lengths(seq, cfg.distill.on_policy_prompt, cfg.distill.on_policy_tokens)
        except ValueError as e:
            raise ConfigError(f"{e} (data.seq_len={seq})") from e
    require(cfg.logits.teacher_text_sequences == 0 or cfg.logits.teacher_text_prompt < seq,
            f"logits.teacher_text_prompt={cfg.logits.teacher_text_prompt} must be below data.seq_len={seq}: the "
            "teacher continues that many tokens of training text up to the sequence length")


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


def config_sources(preset: str = "default", overrides: str | dict[str, Any] = "",
                   **top: str) -> dict[str, tuple[Any, str]]:
    """Where each value of `load_config(preset, overrides, **top)` comes from.

    Returns {dotted key: (value, source)} for every key of the resolved config, in the config's order; source is
    `default` (the dataclass default), `preset <name>` (the preset that set it last; `preset <base> (base of
    <preset>)` for one of its `base:` chain), `option` (a top-level option: teacher=, student=, run_name=, or
    a preset other than `default`) or `SET` (an override). Raises ConfigError as load_config does.
    """
    cfg = load_config(preset, overrides, **top)
    sources = {key: "default" for key in _flat(cfg.to_dict())}
    for name, data in _preset_layers(preset):
        label = f"preset {name}" if name == preset else f"preset {name} (base of {preset})"
        for key in _flat(data):
            sources[key] = label
    if preset != PipelineConfig.preset:
        sources["preset"] = "option"
    for key, value in top.items():
        if value:
            sources[key] = "option"
    set_keys = _flat(parse_overrides(overrides) if isinstance(overrides, str) else overrides)
    for key in set_keys:
        sources[key] = "SET"
    if set_keys:
        sources["overrides"] = "SET"
    return {key: (value, sources[key]) for key, value in _flat(cfg.to_dict()).items()}
