"""Optuna studies over MoCo v2 pretraining, each trial one MLflow run under one parent run per study.

A study is a YAML spec (``sweeps/*.yaml``, validated by :mod:`mococxr.sweep.spec`); its storage,
sampler and pruner are made by :mod:`mococxr.sweep.storage`. This module is the trial objective and
the worker loop.

Why the loop looks the way it does:

- Any number of workers (``mococxr sweep`` processes, on one machine or many) given the same study name
  and storage join one study. ``n_trials`` is the budget of the *study*: a worker runs one trial at a
  time and stops when the finished (COMPLETE + PRUNED) trials reach it, so a restarted command only
  runs what is left and never repeats a finished trial. A worker that finds the rest of the budget
  being run by others waits for them, so it can take over a trial whose worker died (see
  :mod:`mococxr.sweep.storage` for how a dead worker's trial is failed and queued again).
- MLflow linkage is done here rather than by optuna-integration's ``MLflowCallback``: the pretraining run
  *is* the trial's run (a child of the study's parent run), so there is exactly one MLflow run per
  trial and it holds the checkpoints the registry can promote.
- Trials differ only in pretraining keys (``data`` is not searchable), so a worker reads the label CSV
  and splits it once, on its first trial, and hands the same :class:`~mococxr.data.prepare.Prepared`
  to every trial it runs.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mococxr.config import ALIASES, override
from mococxr.console import mococxr
from mococxr.data.prepare import Prepared, prepare
from mococxr.errors import ConfigError
from mococxr.sweep.queue import name_value, open_study, run_once
from mococxr.sweep.spec import Param, StudySpec, load_spec, mask_password, parse_spec, valid_study_name
from mococxr.sweep.storage import make_pruner, make_sampler, make_storage, study_budget
from mococxr.sweep.study_record import create_parent, record_study
from mococxr.sweep.study_trial import FINISHED, _OverBudget, make_objective, trial_config
from mococxr.tracking import mlflow as mt
from mococxr.tracking import runs
from mococxr.tracking.registry import alias_version, promote_best


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
    store: mt.Store | None = None,
) -> SweepResult:
    """Run (or join, or resume) the study ``spec_path`` defines until its trial budget is spent.

    ``n_trials``, ``storage`` and ``study_name`` override the spec. ``promote`` ("staging" or
    "production") registers the best trial's best-epoch checkpoint as a new version of
    ``registered_model`` (default ``mococxr-<backbone>``) and moves that alias to it. ``store`` is the
    MLflow store (the one in force when not given).
    """
    store = mt.current_store(store)
    spec = load_spec(spec_path)
    if n_trials is not None:
        spec = replace(spec, budget=override(spec.budget, {"n_trials": n_trials}, where="flags"))
    if storage:
        spec = replace(spec, storage=storage)
    if study_name:
        spec = replace(spec, name=valid_study_name(study_name, "--study-name"))
    if registered_model:
        spec = replace(spec, registered_model=registered_model)
    return run_study(spec, promote=promote, store=store)


def run_study(
    spec: StudySpec,
    *,
    promote: str | None = None,
    log: Callable[[str], None] | None = None,
    store: mt.Store | None = None,
    data: Prepared | None = None,
) -> SweepResult:
    """The worker loop of :func:`run_sweep` for an already-validated spec.

    ``data`` is the spec's base data already prepared by the caller (else prepared before the first trial).
    """
    store = mt.current_store(store)
    if data is not None and data.config != spec.base.data:
        raise ConfigError(
            f"study {spec.name}: the prepared data is for {data.config}, the spec's base is {spec.base.data}"
        )
    log = log or (lambda line: print(line, flush=True))
    if promote is not None and promote not in ALIASES:
        raise ConfigError(f"promote={promote!r}: use one of {', '.join(ALIASES)}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed below instead
    if spec.storage is None:
        spec = replace(spec, storage=store.optuna_storage)
    study, parent_id = _open_study(spec, log)
    log(
        f"study {spec.name} ({mask_password(spec.storage)}): budget {study_budget(spec)} trials of "
        f"{spec.epochs} epochs, objective {spec.direction} {spec.metric}; MLflow parent run {parent_id}"
    )
    try:
        ran = _work(study, spec, parent_id, log, store, data)
    except BaseException as exc:
        _close_parent(study, spec, parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    best = record_study(study, parent_id, spec.metric, spec)
    trials = study.get_trials(deepcopy=False)
    result = SweepResult(
        study_name=spec.name,
        storage=mask_password(spec.storage),
        parent_run_id=parent_id,
        n_complete=sum(t.state == TrialState.COMPLETE for t in trials),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        trials_run=ran,
    )
    if result.n_complete + result.n_pruned >= study_budget(spec):
        runs.end_parent(parent_id, "FINISHED")
    else:  # this worker gave up (failures in a row): the parent ends too unless others still work
        _close_parent(study, spec, parent_id, "FAILED")
    if best is not None:
        result.best_trial, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        result.best_run_id = best.user_attrs.get("mlflow_run_id")
        result.best_epoch = best.user_attrs.get("best_epoch")
        result.best_model_id = best.user_attrs.get("best_model_id")
        log(
            f"best: trial {best.number} {_fmt_params(best.params)}  {spec.metric} {best.value:.4f} "
            f"at epoch {result.best_epoch} (MLflow run {result.best_run_id})"
        )
    if promote is not None:
        _promote(result, spec, best, promote, log)
    return result


def _close_parent(study: optuna.Study, spec: StudySpec, parent_id: str, status: str) -> None:
    """End the parent run with ``status`` (KILLED on Ctrl-C/SIGTERM) unless another worker is still running
    a trial; never raises, so the error that stopped this worker is the one reported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # dead workers' trials no longer count as running
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            return
        record_study(study, parent_id, spec.metric, spec)
        runs.end_parent(parent_id, status)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def _open_study(spec: StudySpec, log: Callable[[str], None]) -> tuple[optuna.Study, str]:
    """Create the Optuna study and its MLflow parent run (once, see sweep/queue.py), or join it."""
    runs.open_experiment(spec.experiment)

    def setup(study: optuna.Study, repair: bool) -> None:
        if not study.user_attrs.get("mlflow_parent_run_id"):
            study.set_user_attr("mlflow_parent_run_id", create_parent(spec, spec.name))
        study.set_user_attr("mlflow_experiment", spec.experiment)
        name_value(study, spec.metric)

    study = open_study(
        spec.name,
        make_storage(spec),
        grace=spec.heartbeat.grace,
        setup=setup,
        say=log,
        ready=lambda s: bool(s.user_attrs.get("mlflow_parent_run_id")),  # a study made before the mark
        direction=spec.direction,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
    )
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(
            f"study {spec.name!r} in {mask_password(spec.storage)} was created to "
            f"{study.direction.name.lower()}; the spec says {spec.direction}"
        )
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    runs.reopen(parent_id)
    return study, parent_id


def _work(
    study: optuna.Study,
    spec: StudySpec,
    parent_id: str,
    log: Callable[[str], None],
    store: mt.Store,
    data: Prepared | None,
) -> list[int]:
    """Run trials one at a time until the study's finished trials reach its budget; returns their numbers."""
    budget = study_budget(spec)
    ran: list[int] = []
    objective = None  # made before this worker's first trial: a worker with nothing to run reads no data
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
            return ran
        if done + running >= budget:
            if not waiting_said:
                log(f"{running} trial(s) running in other workers cover the budget; waiting for them")
                waiting_said = True
            time.sleep(spec.heartbeat.interval)
            continue
        waiting_said = False
        if objective is None:
            data = data or prepare(spec.base.data)
            objective = make_objective(spec, spec.name, parent_id, ran, data=data, store=store)
        n_before = len(ran)
        t0 = time.perf_counter()
        try:
            study.optimize(
                objective, n_trials=1, catch=(FloatingPointError, _OverBudget), gc_after_trial=True
            )
        finally:
            mine = [t for t in study.get_trials(deepcopy=False) if t.number in ran[n_before:]]
            for t in mine:
                log(_trial_line(t, spec, time.perf_counter() - t0))
            record_study(study, parent_id, spec.metric, spec)
        if any(t.user_attrs.get("fail_reason", "").startswith("over budget") for t in mine):
            continue
        failures = failures + 1 if any(t.state == TrialState.FAIL for t in mine) else 0
        if failures >= spec.budget.max_failures:
            log(f"stopping this worker: {failures} trials in a row failed (see fail_reason in the trials)")
            return ran


def _promote(
    result: SweepResult, spec: StudySpec, best: FrozenTrial | None, alias: str, log: Callable[[str], None]
) -> None:
    if best is None:
        raise ConfigError(f"study {spec.name!r} has no COMPLETE trial to promote")
    name = spec.registered_model or f"mococxr-{spec.base.backbone}"
    result.registered_model = name
    epoch = int(result.best_epoch)

    def promote() -> dict[str, str]:
        run_id = result.best_run_id
        return {"version": promote_best(name, run_id, epoch, alias, study_name=spec.name, trial=best.number)}

    # once among the study's workers (they all reach this point): one registered version, one move
    step = f"{spec.name}.promote.{alias}.trial{best.number}-epoch{epoch}"
    version = run_once(step, spec.storage, promote, heartbeat=spec.heartbeat, say=log)["version"]
    if alias_version(name, alias) != version:  # moved by hand since that step: point it back
        version = promote()["version"]
    result.registered_version = version
    result.promoted_uri = f"models:/{name}@{alias}"
    log(
        f"promoted trial {best.number} epoch {result.best_epoch} as {name} version "
        f"{result.registered_version} to {alias}: {mococxr('finetune', '--init', result.promoted_uri)}"
    )


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


__all__ = [
    "Param",
    "StudySpec",
    "SweepResult",
    "load_spec",
    "make_objective",
    "make_storage",
    "create_parent",
    "parse_spec",
    "promote_best",
    "record_study",
    "run_study",
    "run_sweep",
    "trial_config",
]
