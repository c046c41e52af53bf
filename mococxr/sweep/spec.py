"""Study and grid specs: the YAML files a user copies and edits, validated once into frozen dataclasses.

A *study* (``sweeps/pretrain_lr.yaml``) is an Optuna search over :class:`~mococxr.config.PretrainConfig`
keys: the base config, a budget (epochs per trial, total trials), the objective (the fast linear-probe
AUC on the labeled validation split, ``val/linear_auc``, logged each epoch by the pretraining monitor),
a sampler, a pruner and the heartbeat that lets a dead worker's trial be retried.

A *grid* (``sweeps/finetune_grid.yaml``, the format is shown in :mod:`mococxr.sweep.grid`) is the
paper's fine-tune table in one file: inits x protocols x label fractions x draws of one base config.

The sections of a study (objective, budget, sampler, pruner, heartbeat, a search range) are small
config dataclasses made by :func:`mococxr.config.build`, so unknown keys, types and ranges are checked
the way every config is, and every error names the file and the key. Every value a study can draw is
checked against the base config here, so no trial fails halfway through a study on a typo.
"""

from __future__ import annotations

import itertools
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import optuna

from mococxr.config import (
    PretrainConfig,
    Validated,
    build,
    coerce,
    load_yaml,
    opt,
    override,
    to_dict,
)
from mococxr.errors import ConfigError
from mococxr.sweep.grid_spec import GridSpec, load_grid
from mococxr.sweep.spec_common import (  # noqa: F401 - _fractions, _per_fraction: read by flows/plan.py
    Heartbeat,
    _check_keys,
    _fractions,
    _mapping,
    _per_fraction,
    experiment_name,
    mask_password,
    model_name,
    refuse_keys,
    storage_url,
    study_name,
)

DEFAULT_EXPERIMENT = "mococxr-sweep"
DEFAULT_METRIC = "val/linear_auc"
Sampler = Literal["tpe", "random", "grid"]
Pruner = Literal["median", "successive_halving", "none"]
Direction = Literal["maximize", "minimize"]
# Keys the study itself fixes: the data and epochs define the objective, the rest its bookkeeping.
NOT_SEARCHABLE = frozenset({"data", "epochs", "monitor", "experiment", "run_name", "keep", "workers"})
_PRUNER_ARGS = {
    "median": ("n_startup_trials", "n_warmup_steps"),
    "successive_halving": ("min_resource", "reduction_factor"),
    "none": (),
}
# The base config's keys the study sets for every trial: its experiment and the trials' run names.
_SET_BY_STUDY = ("experiment", "run_name")
_SPEC_KEYS = frozenset(
    {
        "name",
        "storage",
        "experiment",
        "objective",
        "budget",
        "search_space",
        "sampler",
        "pruner",
        "heartbeat",
        "base",
        "registered_model",
    }
)


# -- the sections of a study --------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective(Validated):
    """What a trial scores: the linear-probe AUC the pretraining monitor logs after every epoch."""

    metric: str = opt(DEFAULT_METRIC, "val/linear_auc, or val/linear_auc_<task> for one task of a set")
    direction: Direction = opt("maximize", "maximize or minimize the metric")

    def validate(self) -> None:
        if not self.metric.startswith(DEFAULT_METRIC):
            raise ConfigError(
                f"metric={self.metric!r}: the objective is the fast linear-evaluation AUC, "
                f"{DEFAULT_METRIC!r} (or {DEFAULT_METRIC}_<task> for one task of a multi-task set)"
            )


@dataclass(frozen=True)
class Budget(Validated):
    """The study's budget, shared by all of its workers."""

    n_trials: int | None = opt(
        None, "finished (COMPLETE + PRUNED) trials the study aims for", check="positive"
    )
    epochs: int | None = opt(None, "pretraining epochs per trial (default: base.epochs)", check="positive")
    max_failures: int = opt(3, "failed trials in a row after which a worker gives up", check="positive")

    def validate(self) -> None:
        if self.n_trials is None:
            raise ConfigError("missing required key `n_trials` (finished trials for the whole study)")


@dataclass(frozen=True)
class SamplerSpec(Validated):
    """Optuna's sampler; each trial's draw is seeded from ``(seed, trial number)``."""

    name: Sampler = opt("tpe", "tpe | random | grid (grid needs `choices` for every key)")
    seed: int = opt(0, "seed the per-trial seeds derive from")
    n_startup_trials: int = opt(4, "tpe: random trials before the model takes over", check="nonnegative")


@dataclass(frozen=True)
class PrunerSpec(Validated):
    """Optuna's pruner; each pruner takes only its own arguments (the others are refused)."""

    name: Pruner = opt("median", "median | successive_halving | none")
    n_startup_trials: int | None = opt(
        None, "median: trials before any is pruned (default 2)", check="nonnegative"
    )
    n_warmup_steps: int | None = opt(None, "median: epochs before pruning (default 0)", check="nonnegative")
    min_resource: int | None = opt(None, "successive_halving: epochs of the first rung", check="positive")
    reduction_factor: int | None = opt(
        None, "successive_halving: trials kept per rung = 1/factor", check="positive"
    )

    def validate(self) -> None:
        allowed = _PRUNER_ARGS[self.name]
        stray = [
            k
            for k in _PRUNER_ARGS["median"] + _PRUNER_ARGS["successive_halving"]
            if getattr(self, k) is not None and k not in allowed
        ]
        if stray:
            raise ConfigError(
                f"unknown key(s) {', '.join(stray)} for the {self.name} pruner; known: "
                f"{', '.join(('name', *allowed))}"
            )

    @property
    def args(self) -> dict[str, int]:
        """The arguments given, as the Optuna pruner's keywords."""
        return {k: getattr(self, k) for k in _PRUNER_ARGS[self.name] if getattr(self, k) is not None}


@dataclass(frozen=True)
class Range(Validated):
    """A numeric search range: uniform, or log-uniform with ``log: true``."""

    type: Literal["float", "int"] | None = opt(None, "float or int (default: the config key's type)")
    low: float | None = opt(None, "lowest value")
    high: float | None = opt(None, "highest value")
    log: bool = opt(False, "draw log-uniformly")

    def validate(self) -> None:
        for key in ("low", "high"):
            if getattr(self, key) is None:
                raise ConfigError(f"missing `{key}` (or give `choices`)")
        if not self.low < self.high:
            raise ConfigError(f"low={self.low:g} must be below high={self.high:g}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0, got {self.low:g}")


@dataclass(frozen=True)
class Param:
    """One searched config key: a float/int range (``log`` for log-uniform) or a categorical list."""

    name: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def grid_values(self) -> list[Any]:
        if self.kind != "categorical":
            raise ConfigError(f"search_space.{self.name}: the grid sampler needs `choices`, not a range")
        return list(self.choices)

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"{self.kind}[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


# -- the study ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySpec:
    """A validated study (YAML form: ``sweeps/pretrain_lr.yaml``). ``storage=None`` means the Optuna
    database beside the MLflow store in force (:attr:`mococxr.tracking.mlflow.Store.optuna_storage`)."""

    name: str
    base: PretrainConfig
    search_space: Mapping[str, Param]
    budget: Budget
    objective: Objective = field(default_factory=Objective)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    storage: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    registered_model: str | None = None
    source: str = "<dict>"

    @property
    def metric(self) -> str:
        return self.objective.metric

    @property
    def direction(self) -> str:
        return self.objective.direction

    @property
    def n_trials(self) -> int:
        return int(self.budget.n_trials)

    @property
    def epochs(self) -> int:
        """Pretraining epochs per trial."""
        return self.budget.epochs or self.base.epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "storage": mask_password(self.storage) if self.storage else None,
            "experiment": self.experiment,
            "objective": to_dict(self.objective),
            "budget": {**to_dict(self.budget), "epochs": self.epochs},
            "search_space": {k: p.describe() for k, p in self.search_space.items()},
            "sampler": to_dict(self.sampler),
            "pruner": {"name": self.pruner.name, **self.pruner.args},
            "heartbeat": {**to_dict(self.heartbeat), "grace_period": self.heartbeat.grace},
            "registered_model": self.registered_model,
            "base": to_dict(self.base),
        }


def load_spec(path: str | os.PathLike) -> StudySpec:
    """Read and validate a study YAML; every error names the offending key."""
    return parse_spec(load_yaml(path), source=str(path))


def parse_spec(data: Mapping[str, Any], *, source: str = "<dict>") -> StudySpec:
    """Validate a study mapping (the parsed YAML) into a :class:`StudySpec`."""
    _check_keys(data, _SPEC_KEYS, ("name", "budget", "search_space"), source)
    name = valid_study_name(data["name"], f"{source}: name")
    base_raw = _mapping(data, "base", source)
    refuse_keys(base_raw, _SET_BY_STUDY, f"{source}: base", "the study sets it (experiment, trial run names)")
    base = build(PretrainConfig, base_raw, where=f"{source}: base")
    budget = build(Budget, _mapping(data, "budget", source), where=f"{source}: budget")
    objective = build(Objective, _mapping(data, "objective", source), where=f"{source}: objective")
    _check_metric(objective.metric, base, f"{source}: objective.metric")
    space = _search_space(_mapping(data, "search_space", source), base, source)
    sampler = build(SamplerSpec, _mapping(data, "sampler", source), where=f"{source}: sampler")
    for p in space.values() if sampler.name == "grid" else ():
        if p.kind != "categorical":
            raise ConfigError(
                f"{source}: search_space.{p.name}: the grid sampler needs `choices`, not a range"
            )
    pruner = build(PrunerSpec, _mapping(data, "pruner", source), where=f"{source}: pruner")
    heartbeat = build(Heartbeat, _mapping(data, "heartbeat", source), where=f"{source}: heartbeat")
    budget = replace(budget, epochs=budget.epochs or base.epochs)
    return StudySpec(
        name=name,
        base=_trial_base(base, base_raw, objective, budget.epochs, source),
        search_space=space,
        budget=budget,
        objective=objective,
        sampler=sampler,
        pruner=pruner,
        heartbeat=heartbeat,
        storage=_optional(data, "storage", storage_url, source),
        experiment=_optional(data, "experiment", experiment_name, source) or DEFAULT_EXPERIMENT,
        registered_model=_optional(data, "registered_model", model_name, source),
        source=source,
    )


def valid_study_name(value: Any, where: str) -> str:
    """A study name Optuna and MLflow run names can both hold."""
    return study_name(value, where)


def _check_metric(metric: str, base: PretrainConfig, where: str) -> None:
    """``val/linear_auc_<task>`` names a task of ``base.data.task`` (a set of several), as the monitor logs
    it (spaces as ``_``), so a typo fails now and not after the first trial's first epoch."""
    from mococxr.data.labels import SYNONYMS, resolve_tasks

    if metric == DEFAULT_METRIC:
        return
    tasks = resolve_tasks(base.data.task)
    names = {n.replace(" ", "_") for t in tasks for n in (t, *SYNONYMS.get(t, ()))}
    if len(tasks) < 2 or metric.removeprefix(f"{DEFAULT_METRIC}_") not in names:
        logged = ", ".join(sorted(f"{DEFAULT_METRIC}_{n}" for n in names)) if len(tasks) > 1 else "none"
        raise ConfigError(
            f"{where}={metric!r}: not logged for base.data.task={base.data.task!r}; the monitor logs "
            f"{DEFAULT_METRIC} and, for a set of several tasks, one per task ({logged})"
        )


def _optional(data: Mapping[str, Any], key: str, check: Any, source: str) -> Any:
    """``check(data[key])``, or None where the key is absent or null."""
    return None if data.get(key) is None else check(data[key], f"{source}: {key}")


def _trial_base(
    base: PretrainConfig, base_raw: Mapping[str, Any], objective: Objective, epochs: int, source: str
) -> PretrainConfig:
    """The base every trial starts from: monitored, the study's epochs, and a retention that keeps the
    best epoch (which promotion needs) and the last (which a resumed trial needs)."""
    if "keep" in base_raw:
        if base.keep.startswith("every"):
            raise ConfigError(
                f"{source}: base.keep={base.keep!r} may delete the best epoch, which promotion "
                "needs; use all or best:K:val/linear_auc"
            )
    elif objective.direction == "maximize":
        base = replace(base, keep=f"best:1:{objective.metric}")
    return replace(base, monitor=True, epochs=epochs)


def _search_space(raw: Mapping[str, Any], base: PretrainConfig, source: str) -> dict[str, Param]:
    if not raw:
        raise ConfigError(f"{source}: search_space is empty; name at least one config key to search")
    space: dict[str, Param] = {}
    for name, entry in raw.items():
        where = f"{source}: search_space.{name}"
        if name in NOT_SEARCHABLE or "." in str(name):
            raise ConfigError(f"{where}: {name!r} is fixed by the study (data, budget and bookkeeping)")
        if not hasattr(base, name):
            raise ConfigError(
                f"{where}: not a pretraining config key; known: "
                f"{', '.join(sorted(k for k in to_dict(base) if k not in NOT_SEARCHABLE))}"
            )
        if isinstance(entry, list):
            entry = {"choices": entry}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping or a list of choices, got {entry!r}")
        param = _choices(name, entry, where) if "choices" in entry else _range(name, entry, base, where)
        for value in param.choices or (param.low, param.high):
            # Every value the study can draw must make a valid config, so no trial fails on a typo.
            override(base, {name: value}, where=f"{source}: search_space")
        space[name] = param
    _check_queue(space, base, source)
    return space


def _choices(name: str, entry: Mapping[str, Any], where: str) -> Param:
    _check_keys(entry, {"type", "choices"}, (), where)
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
    hint = typing.get_type_hints(PretrainConfig)[name]
    values = tuple(coerce(c, hint, f"{where}.choices") for c in choices)  # YAML 1.1 reads 1e-3 as text
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}.choices: {list(choices)} repeats a value")
    return Param(name, "categorical", choices=values)


def _range(name: str, entry: Mapping[str, Any], base: PretrainConfig, where: str) -> Param:
    default = getattr(base, name)
    if not isinstance(default, (int, float)) or isinstance(default, bool):
        raise ConfigError(f"{where}: {name} is a {type(default).__name__}; give `choices`")
    spec = build(Range, entry, where=where)
    kind = spec.type or ("int" if isinstance(default, int) else "float")
    return Param(name, kind, low=spec.low, high=spec.high, log=spec.log)


def _check_queue(space: Mapping[str, Param], base: PretrainConfig, source: str) -> None:
    """MoCo's queue holds whole batches: every drawable (moco_k, batch_size) pair must divide."""
    ks = space["moco_k"].choices if "moco_k" in space else (base.moco_k,)
    bs = space["batch_size"].choices if "batch_size" in space else (base.batch_size,)
    if not ks or not bs:
        raise ConfigError(
            f"{source}: search_space: search moco_k and batch_size with `choices` so that "
            "moco_k is a multiple of batch_size for every draw"
        )
    for k, b in itertools.product(ks, bs):
        if int(k) % int(b):
            raise ConfigError(f"{source}: search_space: moco_k={k} is not a multiple of batch_size={b}")


__all__ = [
    "Budget",
    "GridSpec",
    "Heartbeat",
    "Objective",
    "Param",
    "PrunerSpec",
    "Range",
    "SamplerSpec",
    "StudySpec",
    "load_grid",
    "load_spec",
    "mask_password",
    "parse_spec",
    "valid_study_name",
]
