"""Optuna studies over MoCo v2 pretraining, each trial one MLflow run under one parent run per study.

A study is a YAML spec (``sweeps/*.yaml``): a search space over :class:`~mococxr.config.PretrainConfig`
keys, the base config, a budget (epochs per trial, total trials), the objective (the fast linear-probe
AUC on the labeled validation split, ``val/linear_auc``, logged each epoch by the pretraining monitor),
a sampler and a pruner.

Why the loop looks the way it does:

- Any number of workers (``mococxr sweep`` processes, on one machine or many) given the same study name
  and storage join one study. ``n_trials`` is the budget of the *study*: a worker runs one trial at a
  time and stops when the finished (COMPLETE + PRUNED) trials reach it, so a restarted command only
  runs what is left and never repeats a finished trial. A worker that finds the rest of the budget
  being run by others waits for them, so it can take over a trial whose worker died.
- A worker killed mid-trial leaves a RUNNING trial whose heartbeat stops. After the grace period the
  next worker to look marks it FAIL (optuna runs ``fail_stale_trials`` before each trial) and
  ``RetryHeartbeatStaleTrialCallback`` queues a copy with the same parameters, which the next free
  worker runs. The dead trial's MLflow run is marked FAILED at that moment.
- MLflow linkage is done here rather than by optuna-integration's ``MLflowCallback``: the pretraining run
  *is* the trial's run (a child of the study's parent run), so there is exactly one MLflow run per
  trial and it holds the checkpoints the registry can promote.
- Each trial's draw is seeded from ``(seed, trial number)``: a study replays the same way from the same
  history, and concurrent workers never draw the same point because trial numbers are unique.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mococxr.config import PretrainConfig, build, flat_params, load_yaml, override, to_dict
from mococxr.errors import ConfigError
from mococxr.tracking import mlflow as mt

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
DEFAULT_EXPERIMENT = "mococxr-sweep"
DEFAULT_METRIC = "val/linear_auc"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "successive_halving", "none")
STAGES = ("staging", "production")
# Keys the study itself fixes: the data and epochs define the objective, the rest its bookkeeping.
NOT_SEARCHABLE = frozenset({"data", "epochs", "monitor", "experiment", "run_name", "keep", "workers"})
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SPEC_KEYS = {
    "name", "storage", "experiment", "objective", "budget", "search_space", "sampler", "pruner",
    "heartbeat", "base", "registered_model",
}


# -- the spec -----------------------------------------------------------------------------------------
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


@dataclass
class StudySpec:
    """A validated study definition (see ``sweeps/pretrain_lr.yaml`` for the YAML form)."""

    name: str
    base: PretrainConfig
    search_space: dict[str, Param]
    n_trials: int
    epochs: int
    metric: str = DEFAULT_METRIC
    direction: str = "maximize"
    storage: str = DEFAULT_STORAGE
    experiment: str = DEFAULT_EXPERIMENT
    sampler: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 4
    pruner: str = "median"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    max_failures: int = 3  # consecutive failed trials after which a worker gives up
    registered_model: str | None = None
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "storage": _mask_password(self.storage), "experiment": self.experiment,
            "objective": {"metric": self.metric, "direction": self.direction},
            "budget": {"n_trials": self.n_trials, "epochs": self.epochs, "max_failures": self.max_failures},
            "search_space": {k: p.describe() for k, p in self.search_space.items()},
            "sampler": {"name": self.sampler, "seed": self.seed, "n_startup_trials": self.n_startup_trials},
            "pruner": {"name": self.pruner, **self.pruner_args},
            "heartbeat": {"interval": self.heartbeat_interval, "grace_period": self.grace_period,
                          "max_retry": self.max_retry},
            "registered_model": self.registered_model, "base": to_dict(self.base),
        }


def load_spec(path: str | os.PathLike) -> StudySpec:
    """Read and validate a study YAML; every error names the offending key."""
    return parse_spec(load_yaml(path), source=str(path))


def parse_spec(data: Mapping[str, Any], *, source: str = "<dict>") -> StudySpec:
    """Validate a study mapping (the parsed YAML) into a :class:`StudySpec`."""
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_SPEC_KEYS))}")
    for key in ("name", "budget", "search_space"):
        if key not in data:
            raise ConfigError(f"{source}: missing required key `{key}`")
    name = _study_name(data["name"], f"{source}: name")
    base_raw = _mapping(data.get("base"), f"{source}: base")
    base = build(PretrainConfig, base_raw, where=f"{source}: base")

    budget = _mapping(data["budget"], f"{source}: budget")
    _only(budget, {"n_trials", "epochs", "max_failures"}, f"{source}: budget")
    n_trials = _positive_int(budget.get("n_trials"), f"{source}: budget.n_trials")
    epochs = _positive_int(budget.get("epochs", base.epochs), f"{source}: budget.epochs")
    max_failures = _positive_int(budget.get("max_failures", 3), f"{source}: budget.max_failures")

    objective = _mapping(data.get("objective"), f"{source}: objective")
    _only(objective, {"metric", "direction"}, f"{source}: objective")
    metric = str(objective.get("metric", DEFAULT_METRIC))
    if not metric.startswith(DEFAULT_METRIC):
        raise ConfigError(
            f"{source}: objective.metric={metric!r}: the objective is the fast linear-evaluation AUC, "
            f"{DEFAULT_METRIC!r} (or {DEFAULT_METRIC}_<task> for one task of a multi-task set)"
        )
    direction = str(objective.get("direction", "maximize"))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{source}: objective.direction={direction!r}: use maximize or minimize")

    space = _search_space(_mapping(data["search_space"], f"{source}: search_space"), base, source)

    sampler = _mapping(data.get("sampler"), f"{source}: sampler")
    _only(sampler, {"name", "seed", "n_startup_trials"}, f"{source}: sampler")
    sampler_name = str(sampler.get("name", "tpe"))
    if sampler_name not in SAMPLERS:
        raise ConfigError(f"{source}: sampler.name={sampler_name!r}: use one of {', '.join(SAMPLERS)}")
    if sampler_name == "grid":
        for p in space.values():
            if p.kind != "categorical":
                raise ConfigError(f"{source}: search_space.{p.name}: the grid sampler needs `choices`, not a range")
    seed = _int(sampler.get("seed", 0), f"{source}: sampler.seed")
    n_startup = _int(sampler.get("n_startup_trials", 4), f"{source}: sampler.n_startup_trials")

    pruner = _mapping(data.get("pruner"), f"{source}: pruner")
    pruner_name = str(pruner.get("name", "median"))
    if pruner_name not in PRUNERS:
        raise ConfigError(f"{source}: pruner.name={pruner_name!r}: use one of {', '.join(PRUNERS)}")
    pruner_keys = {"median": {"n_startup_trials", "n_warmup_steps"},
                   "successive_halving": {"min_resource", "reduction_factor"}, "none": set()}[pruner_name]
    _only(pruner, pruner_keys | {"name"}, f"{source}: pruner")
    pruner_args = {k: _int(v, f"{source}: pruner.{k}") for k, v in pruner.items() if k != "name"}

    heartbeat = _mapping(data.get("heartbeat"), f"{source}: heartbeat")
    _only(heartbeat, {"interval", "grace_period", "max_retry"}, f"{source}: heartbeat")
    interval = _positive_int(heartbeat.get("interval", 10), f"{source}: heartbeat.interval")
    grace = _positive_int(heartbeat.get("grace_period", 3 * interval), f"{source}: heartbeat.grace_period")
    if grace <= interval:
        raise ConfigError(f"{source}: heartbeat.grace_period={grace} must exceed heartbeat.interval={interval}")
    max_retry = _int(heartbeat.get("max_retry", 2), f"{source}: heartbeat.max_retry")

    if "keep" in base_raw:
        if base.keep.startswith("every"):
            raise ConfigError(f"{source}: base.keep={base.keep!r} may delete the best epoch, which promotion "
                              "needs; use all or best:K:val/linear_auc")
    elif direction == "maximize":
        base = dataclasses.replace(base, keep=f"best:1:{metric}")  # the best epoch (promotion) + the last (resume)
    base = dataclasses.replace(base, monitor=True, epochs=epochs)

    storage = str(data.get("storage") or DEFAULT_STORAGE)
    registered = data.get("registered_model")
    return StudySpec(
        name=name, base=base, search_space=space, n_trials=n_trials, epochs=epochs, metric=metric,
        direction=direction, storage=storage, experiment=str(data.get("experiment") or DEFAULT_EXPERIMENT),
        sampler=sampler_name, seed=seed, n_startup_trials=n_startup, pruner=pruner_name,
        pruner_args=pruner_args, heartbeat_interval=interval, grace_period=grace, max_retry=max_retry,
        max_failures=max_failures, registered_model=str(registered) if registered else None, source=source,
    )


def _search_space(raw: Mapping[str, Any], base: PretrainConfig, source: str) -> dict[str, Param]:
    if not raw:
        raise ConfigError(f"{source}: search_space is empty; name at least one config key to search")
    space: dict[str, Param] = {}
    for name, entry in raw.items():
        where = f"{source}: search_space.{name}"
        if name in NOT_SEARCHABLE or "." in str(name):
            raise ConfigError(f"{where}: {name!r} is fixed by the study (data, budget and bookkeeping)")
        if not hasattr(base, name):
            raise ConfigError(f"{where}: not a pretraining config key; known: "
                              f"{', '.join(sorted(k for k in to_dict(base) if k not in NOT_SEARCHABLE))}")
        default = getattr(base, name)
        if isinstance(entry, list):
            entry = {"choices": entry}
        entry = _mapping(entry, where)
        if "choices" in entry:
            _only(entry, {"type", "choices"}, where)
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
            values = tuple(_typed(c, default, f"{where}.choices") for c in choices)
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}.choices: {list(choices)} repeats a value")
            param = Param(name, "categorical", choices=values)
        else:
            _only(entry, {"type", "low", "high", "log"}, where)
            if not isinstance(default, (int, float)) or isinstance(default, bool):
                raise ConfigError(f"{where}: {name} is a {type(default).__name__}; give `choices`")
            kind = str(entry.get("type", "int" if isinstance(default, int) else "float"))
            if kind not in ("float", "int"):
                raise ConfigError(f"{where}.type={kind!r}: use float, int or give `choices`")
            for key in ("low", "high"):
                if key not in entry:
                    raise ConfigError(f"{where}: missing `{key}` (or give `choices`)")
            low, high = (_number(entry[k], f"{where}.{k}") for k in ("low", "high"))
            log = bool(entry.get("log", False))
            if not low < high:
                raise ConfigError(f"{where}: low={low:g} must be below high={high:g}")
            if log and low <= 0:
                raise ConfigError(f"{where}: a log range needs low > 0, got {low:g}")
            param = Param(name, kind, low=low, high=high, log=log)
        for value in param.choices or (param.low, param.high):
            _check_value(base, name, value, where)
        space[name] = param
    _check_queue(space, base, source)
    return space


def _check_value(base: PretrainConfig, name: str, value: Any, where: str) -> None:
    """Every value the study can draw must be a valid config value, so no trial fails on a typo."""
    from mococxr.data.transforms import PRESETS
    from mococxr.train.schedules import lr_factor

    override(base, {name: value})
    known = {"preset": tuple(PRESETS), "optimizer": ("sgd", "adam")}.get(name)
    if name == "scheduler":
        try:
            lr_factor(0, 10, name=str(value))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif known is not None and value not in known:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, known))}")
    elif name in ("lr", "moco_t", "moco_k", "batch_size") and not float(value) > 0:
        raise ConfigError(f"{where}: {name} must be positive, got {value!r}")


def _check_queue(space: Mapping[str, Param], base: PretrainConfig, source: str) -> None:
    """MoCo's queue holds whole batches: every drawable (moco_k, batch_size) pair must divide."""
    ks = space["moco_k"].choices if "moco_k" in space else (base.moco_k,)
    bs = space["batch_size"].choices if "batch_size" in space else (base.batch_size,)
    if not ks or not bs:
        raise ConfigError(f"{source}: search_space: search moco_k and batch_size with `choices` so that "
                          "moco_k is a multiple of batch_size for every draw")
    for k, b in itertools.product(ks, bs):
        if int(k) % int(b):
            raise ConfigError(f"{source}: search_space: moco_k={k} is not a multiple of batch_size={b}")


def _typed(value: Any, default: Any, where: str) -> Any:
    """A YAML value as the config field's type (``1e-3`` is a string in YAML 1.1)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float):
        return _number(value, where)
    if isinstance(default, int):
        number = _number(value, where)
        if number != int(number):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a scalar, got {value!r}")
    return str(value)


def _number(value: Any, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return out


def _int(value: Any, where: str) -> int:
    number = _number(value, where)
    if number != int(number):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(number)


def _positive_int(value: Any, where: str) -> int:
    out = _int(value, where)
    if out < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _only(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")


def _study_name(value: Any, where: str) -> str:
    name = str(value)
    if not _STUDY_NAME.match(name):
        raise ConfigError(f"{where}={value!r}: use letters, digits, '.', '_' and '-' only")
    return name


def _mask_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# -- optuna pieces --------------------------------------------------------------------------------------
def make_storage(spec: StudySpec) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats, so a dead worker's trial is failed and retried with the same params."""
    url = spec.storage
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise ConfigError(f"storage {_mask_password(url)!r}: use sqlite:///PATH for one machine or "
                          "postgresql://USER:PASSWORD@HOST/DB for several")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers share one file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry)
        for attempt in range(3):  # workers starting together on a new database race to create its tables
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=spec.heartbeat_interval,
                    grace_period=spec.grace_period,
                    heartbeat_stale_trial_callback=_StaleTrialHandler(retry, spec.experiment),
                )
            except Exception as exc:  # unreachable server, bad credentials, missing driver
                if attempt == 2:
                    raise ConfigError(f"cannot open optuna storage {_mask_password(url)!r}: {exc}") from None
                time.sleep(1 + attempt)
    raise AssertionError("unreachable")


class _StaleTrialHandler:
    """Marks a dead worker's MLflow run FAILED, then lets optuna queue the retry (same params)."""

    def __init__(self, retry: Callable[[optuna.Study, FrozenTrial], None], experiment: str) -> None:
        self.retry = retry
        self.experiment = experiment

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id") or _trial_run_id(self.experiment, study.study_name,
                                                                        trial.number)
        if run_id:
            client = MlflowClient()
            client.set_tag(run_id, mt.tag("optuna_state"), TrialState.FAIL.name)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
        print(f"trial {trial.number}: its worker stopped sending heartbeats; marked FAIL"
              + (f" (MLflow run {run_id} FAILED)" if run_id else "") + ", queued a retry with the same params",
              flush=True)
        self.retry(study, trial)


class _PerTrialSeed(optuna.samplers.BaseSampler):
    """Seeds the wrapped sampler from ``(seed, trial number)`` before each trial (see module docstring)."""

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build = build
        self._seed = seed
        self._inner = build(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # MT19937 seeded with neighbouring small integers draws nearly equal first numbers: hash them.
        state = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
        self._inner = self._build(int(state))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._inner.after_trial(study, trial, state, values)


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        grid = {k: p.grid_values() for k, p in spec.search_space.items()}
        return _PerTrialSeed(lambda s: optuna.samplers.GridSampler(grid, seed=s), spec.seed)
    if spec.sampler == "random":
        return _PerTrialSeed(lambda s: optuna.samplers.RandomSampler(seed=s), spec.seed)
    return _PerTrialSeed(
        lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=spec.n_startup_trials), spec.seed
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**spec.pruner_args)
    args = {"n_startup_trials": 2, "n_warmup_steps": 0, **spec.pruner_args}
    return optuna.pruners.MedianPruner(**args)


def study_budget(spec: StudySpec) -> int:
    """Finished trials the study aims for: ``n_trials``, or fewer when a grid has fewer points."""
    if spec.sampler != "grid":
        return spec.n_trials
    return min(spec.n_trials, math.prod(len(p.choices) for p in spec.search_space.values()))


# -- MLflow linkage -----------------------------------------------------------------------------------
def _trial_run_id(experiment: str, study_name: str, number: int) -> str | None:
    """The MLflow run of a trial, found by its tags (used when the worker died before recording it)."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        f"tags.`{mt.tag('optuna_study')}` = '{study_name}' AND tags.`{mt.tag('optuna_trial')}` = '{number}' "
        f"AND tags.`{mt.tag('kind')}` = 'pretrain'",
    )
    return runs[0].info.run_id if runs else None


def _open_tracking(experiment: str) -> None:
    """First contact with the MLflow store, retried: workers starting together on a new sqlite store
    race in its schema migration and all but one fail once."""
    for attempt in range(3):
        try:
            mt.ensure_experiment(experiment)
            return
        except Exception:
            if attempt == 2:
                raise
            time.sleep(2 + 2 * attempt)


def parent_run(spec: StudySpec, study_name: str) -> str:
    """Find or create the study's parent run; concurrent workers converge on the oldest one."""
    exp_id = mt.ensure_experiment(spec.experiment)
    client = MlflowClient()
    query = f"tags.`{mt.tag('kind')}` = 'sweep' AND tags.`{mt.tag('optuna_study')}` = '{study_name}'"

    def parents() -> list[Any]:
        runs = client.search_runs([exp_id], query, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = parents()
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        exp_id, run_name=study_name,
        tags={**mt.tags(kind="sweep", optuna_study=study_name, backbone=spec.base.backbone,
                        dataset=spec.base.data.dataset, task=spec.base.data.task),
              "mlflow.note.content": f"Optuna study {study_name} over MoCo v2 pretraining ({spec.source})"},
    )
    winner = parents()[0].info.run_id
    if winner != run.info.run_id:  # another worker created one first
        client.delete_run(run.info.run_id)
        return winner
    params = {f"search.{k}": p.describe() for k, p in spec.search_space.items()}
    params.update({f"base.{k}": v for k, v in flat_params(spec.base).items() if k not in ("epochs", "keep")})
    params.update({"objective": spec.metric, "direction": spec.direction, "epochs_per_trial": spec.epochs,
                   "sampler": spec.sampler, "pruner": spec.pruner, "seed": spec.seed})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    mt.log_json(spec.to_dict(), "sweep.json", run_id=run.info.run_id)
    return run.info.run_id


def record_study(study: optuna.Study, parent_run_id: str, metric: str) -> FrozenTrial | None:
    """Write the study's counts and best trial (run, epoch, score) on the parent run; returns the best.

    The best checkpoint is named with the same tags a fine-tune run uses for its init:
    ``mococxr.pretrain_run_id`` and ``mococxr.checkpoint_epoch``; ``mococxr.optuna_trial`` is its number.
    """
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in (*FINISHED, TrialState.FAIL)}
    step = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    now = int(time.time() * 1000)
    metrics = [Metric(f"sweep/n_{s.name.lower()}", counts[s], now, step) for s in counts]
    tags: list[RunTag] = []
    best = _best_trial(study)
    if best is not None:
        metrics += [Metric(metric, best.value, now, step), Metric("sweep/best_trial", best.number, now, step),
                    Metric("sweep/best_epoch", best.user_attrs.get("best_epoch", -1), now, step)]
        tags = [RunTag(mt.tag("pretrain_run_id"), str(best.user_attrs.get("mlflow_run_id", ""))),
                RunTag(mt.tag("checkpoint_epoch"), str(best.user_attrs.get("best_epoch", ""))),
                RunTag(mt.tag("optuna_trial"), str(best.number))]
    MlflowClient().log_batch(parent_run_id, metrics=metrics, tags=tags)
    return best


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))


# -- one trial ------------------------------------------------------------------------------------------
class _OverBudget(Exception):
    """Another worker claimed the last slot of the budget between our count and our ask."""


def trial_config(spec: StudySpec, params: Mapping[str, Any], study_name: str, number: int) -> PretrainConfig:
    cfg = override(spec.base, dict(params))
    return dataclasses.replace(cfg, monitor=True, epochs=spec.epochs, experiment=spec.experiment,
                               run_name=f"{study_name}-trial{number:03d}")


def make_objective(
    spec: StudySpec, study_name: str, parent_run_id: str, started: list[int] | None = None
) -> Callable[[optuna.Trial], float]:
    """The trial function: pretrain with the drawn params, report the metric each epoch, prune early.

    ``started`` collects the numbers of the trials this function ran (one worker's share). A trial
    interrupted with Ctrl-C is FAIL and queued again with the same params, so the next run resumes it.
    """
    from mococxr.train.pretrain import StopTraining, pretrain

    sign = 1 if spec.direction == "maximize" else -1

    def objective(trial: optuna.Trial) -> float:
        if started is not None:
            started.append(trial.number)
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        trials = trial.study.get_trials(deepcopy=False)
        ahead = [t for t in trials if t.number < trial.number and t.state in (*FINISHED, TrialState.RUNNING)]
        if len(ahead) >= study_budget(spec):
            trial.set_user_attr("fail_reason", "over budget: other workers took the remaining trials")
            raise _OverBudget()
        retried = next(t for t in trials if t.number == trial.number).system_attrs.get("failed_trial")
        if retried is not None:  # the retry inherited the dead trial's user attrs; its run is not ours
            trial.set_user_attr("retry_of_trial", retried)
            trial.set_user_attr("retry_of_mlflow_run_id", trial.user_attrs.get("mlflow_run_id", ""))
            trial.set_user_attr("mlflow_run_id", "")
            trial.set_user_attr("fail_reason", "")
        box: dict[str, Any] = {}

        def on_epoch_end(epoch: int, encoder: Any, metrics: dict[str, float]) -> None:
            if "run_id" not in box:
                box["run_id"] = mlflow.active_run().info.run_id
                trial.set_user_attr("mlflow_run_id", box["run_id"])
            if spec.metric not in metrics:
                raise ConfigError(f"{spec.source}: objective.metric {spec.metric!r} is not logged; the monitor "
                                  f"logs {sorted(k for k in metrics if k.startswith('val/'))}")
            trial.report(metrics[spec.metric], epoch)
            if epoch < spec.epochs and trial.should_prune():  # a trial that ran its budget is COMPLETE
                raise StopTraining()

        state = TrialState.FAIL
        try:
            params = {name: p.suggest(trial) for name, p in spec.search_space.items()}
            cfg = trial_config(spec, params, study_name, trial.number)
            result = pretrain(cfg, parent_run_id=parent_run_id, on_epoch_end=on_epoch_end, progress=False,
                              extra_tags=mt.tags(optuna_study=study_name, optuna_trial=trial.number))
            box["run_id"] = result.run_id
            trial.set_user_attr("mlflow_run_id", result.run_id)
            scored = {e: m[spec.metric] for e, m in result.history.items() if math.isfinite(m[spec.metric])}
            if not scored:
                raise FloatingPointError(f"{spec.metric} was never finite")
            best_epoch = max(scored, key=lambda e: (sign * scored[e], -e))
            trial.set_user_attr("best_epoch", best_epoch)
            trial.set_user_attr("best_model_id", result.model_ids[best_epoch])
            if result.stopped_early:
                state = TrialState.PRUNED
                raise optuna.TrialPruned(f"pruned after epoch {max(result.history)}")
            state = TrialState.COMPLETE
            return scored[best_epoch]
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted; queued again with the same params")
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry)(trial.study, frozen)
            raise
        except Exception as exc:
            if state == TrialState.FAIL:
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            run_id = box.get("run_id") or _trial_run_id(spec.experiment, study_name, trial.number)
            if run_id:
                MlflowClient().set_tag(run_id, mt.tag("optuna_state"), state.name)

    return objective


# -- the worker -----------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    study_name: str
    storage: str
    parent_run_id: str
    n_complete: int
    n_pruned: int
    n_failed: int
    trials_run: list[int] = field(default_factory=list)  # trial numbers this worker ran
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None
    best_epoch: int | None = None
    best_model_id: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    promoted_uri: str | None = None


def run_sweep(
    spec_path: str | os.PathLike,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    promote: str | None = None,
    registered_model: str | None = None,
) -> SweepResult:
    """Run (or join, or resume) the study ``spec_path`` defines until its trial budget is spent.

    ``n_trials``, ``storage`` and ``study_name`` override the spec. ``promote`` ("staging" or
    "production") registers the best trial's best-epoch checkpoint as a new version of
    ``registered_model`` (default ``mococxr-<backbone>``) and moves it to that stage.
    """
    spec = load_spec(spec_path)
    if n_trials is not None:
        spec.n_trials = _positive_int(n_trials, "--n-trials")
    if storage:
        spec.storage = storage
    if study_name:
        spec.name = _study_name(study_name, "--study-name")
    if registered_model:
        spec.registered_model = registered_model
    return run_study(spec, promote=promote)


def run_study(spec: StudySpec, *, promote: str | None = None, log: Callable[[str], None] | None = None) -> SweepResult:
    """The worker loop of :func:`run_sweep` for an already-validated spec."""
    log = log or (lambda line: print(line, flush=True))
    if promote is not None and promote not in STAGES:
        raise ConfigError(f"promote={promote!r}: use one of {', '.join(STAGES)}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed below instead
    mt.configure()
    _open_tracking(spec.experiment)
    storage = make_storage(spec)
    study = optuna.create_study(
        study_name=spec.name, storage=storage, load_if_exists=True, direction=spec.direction,
        sampler=make_sampler(spec), pruner=make_pruner(spec),
    )
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(f"study {spec.name!r} in {_mask_password(spec.storage)} was created to "
                          f"{study.direction.name.lower()}; the spec says {spec.direction}")
    parent_id = parent_run(spec, spec.name)
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    study.set_user_attr("mlflow_experiment", spec.experiment)
    budget = study_budget(spec)
    ran: list[int] = []
    objective = make_objective(spec, spec.name, parent_id, ran)
    log(f"study {spec.name} ({_mask_password(spec.storage)}): budget {budget} trials of {spec.epochs} epochs, "
        f"objective {spec.direction} {spec.metric}; MLflow parent run {parent_id}")

    failures = 0
    waiting_said = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done >= budget:
            break
        if done + running >= budget:
            if not waiting_said:
                log(f"{running} trial(s) running in other workers cover the budget; waiting for them")
                waiting_said = True
            time.sleep(spec.heartbeat_interval)
            continue
        waiting_said = False
        n_before = len(ran)
        t0 = time.perf_counter()
        try:
            study.optimize(objective, n_trials=1, catch=(FloatingPointError, _OverBudget), gc_after_trial=True)
        finally:
            mine = [t for t in study.get_trials(deepcopy=False) if t.number in ran[n_before:]]
            for t in mine:
                log(_trial_line(t, spec, time.perf_counter() - t0))
            record_study(study, parent_id, spec.metric)
        if any(t.user_attrs.get("fail_reason", "").startswith("over budget") for t in mine):
            continue
        failures = failures + 1 if any(t.state == TrialState.FAIL for t in mine) else 0
        if failures >= spec.max_failures:
            log(f"stopping this worker: {failures} trials in a row failed (see fail_reason in the trials)")
            break

    best = record_study(study, parent_id, spec.metric)
    trials = study.get_trials(deepcopy=False)
    result = SweepResult(
        study_name=spec.name, storage=_mask_password(spec.storage), parent_run_id=parent_id,
        n_complete=sum(t.state == TrialState.COMPLETE for t in trials),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials), trials_run=ran,
    )
    if result.n_complete + result.n_pruned >= budget:
        MlflowClient().set_terminated(parent_id, "FINISHED")
    if best is not None:
        result.best_trial, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        result.best_run_id = best.user_attrs.get("mlflow_run_id")
        result.best_epoch = best.user_attrs.get("best_epoch")
        result.best_model_id = best.user_attrs.get("best_model_id")
        log(f"best: trial {best.number} {_fmt_params(best.params)}  {spec.metric} {best.value:.4f} "
            f"at epoch {result.best_epoch} (MLflow run {result.best_run_id})")
    if promote is not None:
        if best is None:
            raise ConfigError(f"study {spec.name!r} has no COMPLETE trial to promote")
        name = spec.registered_model or f"mococxr-{spec.base.backbone}"
        result.registered_model = name
        result.registered_version = promote_best(name, result.best_run_id, int(result.best_epoch), promote,
                                                 study_name=spec.name, trial=best.number)
        result.promoted_uri = f"models:/{name}/{promote.capitalize()}"
        log(f"promoted trial {best.number} epoch {result.best_epoch} as {name} version "
            f"{result.registered_version} to {promote}: mococxr finetune --init {result.promoted_uri}")
    return result


def promote_best(name: str, run_id: str, epoch: int, stage: str, *, study_name: str, trial: int) -> str:
    """Register ``run_id``'s ``epoch`` checkpoint and move it to ``stage``; reuse the version if it holds it."""
    from mococxr.tracking import registry

    client = MlflowClient()
    try:
        holder = client.get_model_version_by_alias(name, stage)
    except mlflow.exceptions.MlflowException:
        holder = None
    if (holder is not None and holder.tags.get(mt.TAG_PREFIX + "run_id") == run_id
            and holder.tags.get(mt.tag("checkpoint_epoch")) == str(epoch)):
        return str(holder.version)  # another worker of this study promoted it already
    version = registry.register(name, run_id=run_id, epoch=epoch,
                                extra_tags=mt.tags(optuna_study=study_name, optuna_trial=trial))
    registry.promote(name, version, stage)
    return version


def _fmt_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _trial_line(t: FrozenTrial, spec: StudySpec, elapsed: float) -> str:
    if t.state == TrialState.COMPLETE:
        score = f"{spec.metric} {t.value:.4f} (epoch {t.user_attrs.get('best_epoch')})"
    elif t.state == TrialState.PRUNED:
        last = max(t.intermediate_values) if t.intermediate_values else None
        score = f"{spec.metric} {t.intermediate_values[last]:.4f} at epoch {last}" if last else "no score"
    else:
        score = t.user_attrs.get("fail_reason", "failed")
    retry = f" (retry of trial {t.system_attrs['failed_trial']})" if "failed_trial" in t.system_attrs else ""
    return f"trial {t.number}{retry}  {_fmt_params(t.params)}  {score}  {t.state.name}  {elapsed:.1f} s"


__all__ = ["Param", "StudySpec", "SweepResult", "load_spec", "parse_spec", "run_study",
           "run_sweep", "make_storage", "parent_run", "record_study", "promote_best"]
