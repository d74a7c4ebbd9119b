"""What `moe-distill sweep` searches: one declarative table, {config key: distribution}.

A new knob (the on-policy rate, a layer-wise weight, once `distill.config.DistillConfig` has them) is one more
row here; the sweep samples every row, writes the winner's values into the preset it writes, and logs them as
the trial's MLflow params. A row may apply only when another key has one of some values (`when`): `beta` only
for the `jsd` loss, say, so trials do not spend samples on a setting their loss ignores.

Ranges stay inside what `DistillConfig.validate` accepts (`tests/test_sweep.py` checks both ends of each).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Floats:
    """A float in [low, high]; `log`: sampled uniformly in log space (rates, temperatures)."""

    low: float
    high: float
    log: bool = False

    def sample(self, trial: optuna.Trial, key: str) -> float:
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def extremes(self) -> tuple[float, float]:
        return self.low, self.high


@dataclass(frozen=True)
class Choice:
    """One of a fixed list of values (strings, numbers or booleans)."""

    choices: tuple[Any, ...]

    def sample(self, trial: optuna.Trial, key: str) -> Any:
        return trial.suggest_categorical(key, list(self.choices))

    def extremes(self) -> tuple[Any, ...]:
        return self.choices


@dataclass(frozen=True)
class Knob:
    """One row of the table: a distribution, and optionally the condition under which the key matters:
    `when=("distill.loss", ("jsd",))` samples it only when that key (sampled earlier in the table, or the
    base configuration's value when not searched) is one of those values."""

    dist: Floats | Choice
    # one condition (key, values), or a tuple of them that must all hold
    when: tuple[str, tuple[Any, ...]] | tuple[tuple[str, tuple[Any, ...]], ...] | None = None

    @property
    def conditions(self) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        if self.when is None:
            return ()
        return (self.when,) if isinstance(self.when[0], str) else self.when  # type: ignore[return-value]


# The KD knobs of `distill.config.DistillConfig`. Order matters only for `when`: a condition names an earlier row
# or a key that is not searched. Not here on purpose: the teacher's form (`teacher_mode`; online is many times
# slower, so it would decide the trials' cost rather than the recipe), and the sizes, steps and seeds that set
# the budget every trial must share to be comparable.
SEARCH_SPACE: dict[str, Knob] = {
    "distill.loss": Knob(Choice(("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"))),
    "distill.beta": Knob(Floats(0.1, 0.9), when=("distill.loss", ("jsd",))),
    "distill.alpha": Knob(Floats(0.05, 0.5), when=("distill.loss", ("skew_kl", "skew_reverse_kl"))),
    "distill.temperature": Knob(Floats(0.5, 4.0, log=True)),
    "distill.kd_weight": Knob(Floats(0.25, 2.0)),
    "distill.ce_weight": Knob(Floats(0.0, 1.0)),
    "distill.lr": Knob(Floats(3e-5, 1e-3, log=True)),
    "distill.warmup_steps": Knob(Choice((0, 1, 2, 4))),
    # These need the teacher in the loop: searched when the base preset sets distill.teacher_mode=online (which
    # loads it once for all trials), skipped otherwise so a cache-only sweep stays as cheap as its trials.
    "distill.hidden_weight": Knob(Floats(0.0, 1.0), when=("distill.teacher_mode", ("online",))),
    "distill.on_policy_rate": Knob(Floats(0.0, 1.0), when=("distill.teacher_mode", ("online",))),
    "distill.on_policy_loss": Knob(Choice(("reverse_kl", "jsd", "forward_kl")), when=("distill.teacher_mode", ("online",))),
    # derived students only: their config maps each layer to its teacher layer (distill/layer_transfer.py)
    "distill.layer_weight": Knob(Floats(0.0, 1.0), when=(("distill.teacher_mode", ("online",)),
                                                          ("student", ("derived",)))),
}


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def applies(knob: Knob, config: dict[str, Any]) -> bool:
    """Whether `knob` matters for `config` (a nested dict as `PipelineConfig.to_dict()` gives)."""
    return all(_get(config, key) in values for key, values in knob.conditions)


def sample(trial: optuna.Trial, base: dict[str, Any], fixed: frozenset[str] = frozenset(),
           space: dict[str, Knob] | None = None) -> dict[str, Any]:
    """The trial's values: {key: value} for every row of `space` (default SEARCH_SPACE) that applies, except
    the keys in `fixed` (set by the user, so held at the base value). `base`: the nested config dict the
    trial starts from; it is not changed."""
    config = _copy(base)
    values: dict[str, Any] = {}
    for key, knob in (SEARCH_SPACE if space is None else space).items():
        if key in fixed or not applies(knob, config):
            continue
        values[key] = knob.dist.sample(trial, key)
        _set(config, key, values[key])
    return values


def _copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def check_space(space: dict[str, Knob], config: Any) -> None:
    """Every key and every condition names a setting of `config` (a `PipelineConfig`); raises ConfigError naming
    the row otherwise, so a renamed config key cannot silently drop out of the search."""
    for key, knob in space.items():
        for name in (key, *(c[0] for c in knob.conditions)):
            node = config
            for part in name.split("."):
                if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                    raise ConfigError(f"sweep search space: {name!r} (row {key!r}) is not a config key")
                node = getattr(node, part)
