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

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from optuna.trial import FrozenTrial, TrialState

from mococxr.config import STAGES, PretrainConfig, flat_params, override
from mococxr.console import mococxr
from mococxr.data.prepare import Prepared, prepare
from mococxr.errors import ConfigError
from mococxr.sweep.spec import Param, StudySpec, load_spec, mask_password, parse_spec, valid_study_name
from mococxr.sweep.storage import make_pruner, make_sampler, make_storage, study_budget
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import runs
from mococxr.tracking.runs import promote_best

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# -- MLflow linkage -----------------------------------------------------------------------------------
def parent_run(spec: StudySpec, study_name: str) -> str:
    """Find or create the study's parent run; concurrent workers converge on the oldest one."""
    base = spec.base

    def describe(run_id: str) -> None:
        params = {f"search.{k}": p.describe() for k, p in spec.search_space.items()}
        params.update({f"base.{k}": v for k, v in flat_params(base).items() if k not in ("epochs", "keep")})
        params.update({"objective": spec.metric, "direction": spec.direction, "epochs_per_trial": spec.epochs,
                       "sampler": spec.sampler.name, "pruner": spec.pruner.name, "seed": spec.sampler.seed})
        MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
        ma.log_json(spec.to_dict(), "sweep.json", run_id=run_id)

    return runs.parent_run(
        spec.experiment, key=mt.tags(kind="sweep", optuna_study=study_name), run_name=study_name,
        tags={**mt.tags(backbone=base.backbone, dataset=base.data.dataset, task=base.data.task),
              MLFLOW_RUN_NOTE: describe_study(spec, study_name)},
        describe=describe,
    )


def record_study(study: optuna.Study, parent_run_id: str, metric: str,
                 spec: StudySpec | None = None) -> FrozenTrial | None:
    """Write the study's counts and best trial (run, epoch, score) on the parent run; returns the best.

    The best checkpoint is named with the same tags a fine-tune run uses for its init:
    ``mococxr.pretrain_run_id`` and ``mococxr.checkpoint_epoch``; ``mococxr.optuna_trial`` is its number.
    With ``spec``, the parent's description (``mlflow.note.content``) is rewritten with the same summary.
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
    if spec is not None:
        tags.append(RunTag(MLFLOW_RUN_NOTE, describe_study(spec, study.study_name, counts, best)))
    MlflowClient().log_batch(parent_run_id, metrics=metrics, tags=tags)
    return best


def describe_study(spec: StudySpec, study_name: str, counts: Mapping[TrialState, int] | None = None,
                   best: FrozenTrial | None = None) -> str:
    """The study parent's description: what is searched, for what, how far it got, how to re-run or join it."""
    space = ", ".join(f"{k} {p.describe()}" for k, p in spec.search_space.items())
    text = (f"Optuna study **{study_name}** over MoCo v2 pretraining ({spec.source}): {spec.sampler.name} "
            f"sampler, {spec.pruner.name} pruner, budget {study_budget(spec)} trials of {spec.epochs} epochs, "
            f"{spec.direction} {spec.metric}; search space: {space}.")
    if counts is not None:
        text += (f" So far {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                 f"{counts[TrialState.FAIL]} failed trials.")
    if best is not None:
        text += f" Best: trial {best.number}, {spec.metric} {best.value:.4f} at epoch {best.user_attrs.get('best_epoch')}."
    # a spec read from a YAML file can be run again as is; one made in code (the demo) by the command that made it
    again = f"`mococxr sweep {spec.source}`" if spec.source.endswith((".yaml", ".yml")) else "the command that started it"
    return text + (f"\n\nRe-run or join it (another worker, same storage): {again}; "
                   "finished trials are never repeated.")


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
    return replace(cfg, monitor=True, epochs=spec.epochs, experiment=spec.experiment,
                   run_name=f"{study_name}-trial{number:03d}")


def make_objective(
    spec: StudySpec, study_name: str, parent_run_id: str, started: list[int] | None = None, *,
    data: Prepared | None = None, store: mt.Store | None = None,
) -> Callable[[optuna.Trial], float]:
    """The trial function: pretrain with the drawn params, report the metric each epoch, prune early.

    ``started`` collects the numbers of the trials this function ran (one worker's share); ``data`` is
    the study's prepared base data, shared by every trial. A trial interrupted with Ctrl-C is FAIL and
    queued again with the same params, so the next run resumes it.
    """
    from mococxr.train.pretrain import pretrain

    def objective(trial: optuna.Trial) -> float:
        if started is not None:
            started.append(trial.number)
        _claim(trial, spec)
        box: dict[str, Any] = {}
        state = TrialState.FAIL
        try:
            params = {name: p.suggest(trial) for name, p in spec.search_space.items()}
            cfg = trial_config(spec, params, study_name, trial.number)
            result = pretrain(cfg, data=data, store=store, parent_run_id=parent_run_id,
                              on_epoch_end=_reporter(trial, spec, box), progress=False,
                              extra_tags=mt.tags(optuna_study=study_name, optuna_trial=trial.number))
            box["run_id"] = result.run_id
            trial.set_user_attr("mlflow_run_id", result.run_id)
            best_epoch, value = _best_epoch(result.history, spec)
            trial.set_user_attr("best_epoch", best_epoch)
            trial.set_user_attr("best_model_id", result.model_ids[best_epoch])
            if result.stopped_early:
                state = TrialState.PRUNED
                raise optuna.TrialPruned(f"pruned after epoch {max(result.history)}")
            state = TrialState.COMPLETE
            return value
        except KeyboardInterrupt:
            _queue_again(trial, spec)
            raise
        except Exception as exc:
            if state == TrialState.FAIL:
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            run_id = box.get("run_id") or runs.trial_run_id(spec.experiment, study_name, trial.number)
            if run_id:
                MlflowClient().set_tag(run_id, mt.tag("optuna_state"), state.name)

    return objective


def _claim(trial: optuna.Trial, spec: StudySpec) -> None:
    """Take the trial for this worker, or give it up when other workers already cover the budget."""
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


def _reporter(trial: optuna.Trial, spec: StudySpec, box: dict[str, Any]) -> Callable[..., None]:
    """The pretraining epoch callback: records the trial's run, reports the metric, prunes."""
    from mococxr.train.pretrain import StopTraining

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

    return on_epoch_end


def _best_epoch(history: Mapping[int, Mapping[str, float]], spec: StudySpec) -> tuple[int, float]:
    """(epoch, value) of the trial's best finite score; the earliest epoch wins a tie."""
    scored = {e: m[spec.metric] for e, m in history.items() if math.isfinite(m[spec.metric])}
    if not scored:
        raise FloatingPointError(f"{spec.metric} was never finite")
    sign = 1 if spec.direction == "maximize" else -1
    best = max(scored, key=lambda e: (sign * scored[e], -e))
    return best, scored[best]


def _queue_again(trial: optuna.Trial, spec: StudySpec) -> None:
    """Ctrl-C: queue a copy of the trial with the same params, as for a dead worker."""
    trial.set_user_attr("fail_reason", "interrupted; queued again with the same params")
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.heartbeat.max_retry)(trial.study, frozen)


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
    ``registered_model`` (default ``mococxr-<backbone>``) and moves it to that stage. ``store`` is the
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


def run_study(spec: StudySpec, *, promote: str | None = None, log: Callable[[str], None] | None = None,
              store: mt.Store | None = None, data: Prepared | None = None) -> SweepResult:
    """The worker loop of :func:`run_sweep` for an already-validated spec.

    ``data`` is the spec's base data already prepared by the caller (else prepared before the first trial).
    """
    store = mt.current_store(store)
    if data is not None and data.config != spec.base.data:
        raise ConfigError(f"study {spec.name}: the prepared data is for {data.config}, the spec's base is "
                          f"{spec.base.data}")
    log = log or (lambda line: print(line, flush=True))
    if promote is not None and promote not in STAGES:
        raise ConfigError(f"promote={promote!r}: use one of {', '.join(STAGES)}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed below instead
    if spec.storage is None:
        spec = replace(spec, storage=store.optuna_storage)
    study, parent_id = _open_study(spec)
    log(f"study {spec.name} ({mask_password(spec.storage)}): budget {study_budget(spec)} trials of {spec.epochs} "
        f"epochs, objective {spec.direction} {spec.metric}; MLflow parent run {parent_id}")
    try:
        ran = _work(study, spec, parent_id, log, store, data)
    except BaseException as exc:
        _close_parent(study, spec, parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    best = record_study(study, parent_id, spec.metric, spec)
    trials = study.get_trials(deepcopy=False)
    result = SweepResult(
        study_name=spec.name, storage=mask_password(spec.storage), parent_run_id=parent_id,
        n_complete=sum(t.state == TrialState.COMPLETE for t in trials),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials), trials_run=ran,
    )
    if result.n_complete + result.n_pruned >= study_budget(spec):
        MlflowClient().set_terminated(parent_id, "FINISHED")
    else:  # this worker gave up (failures in a row): the parent ends too unless others still work
        _close_parent(study, spec, parent_id, "FAILED")
    if best is not None:
        result.best_trial, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        result.best_run_id = best.user_attrs.get("mlflow_run_id")
        result.best_epoch = best.user_attrs.get("best_epoch")
        result.best_model_id = best.user_attrs.get("best_model_id")
        log(f"best: trial {best.number} {_fmt_params(best.params)}  {spec.metric} {best.value:.4f} "
            f"at epoch {result.best_epoch} (MLflow run {result.best_run_id})")
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
        MlflowClient().set_terminated(parent_id, status)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def _open_study(spec: StudySpec) -> tuple[optuna.Study, str]:
    """Create or load the Optuna study and its MLflow parent run, and link them."""
    runs.open_experiment(spec.experiment)
    study = optuna.create_study(
        study_name=spec.name, storage=make_storage(spec), load_if_exists=True, direction=spec.direction,
        sampler=make_sampler(spec), pruner=make_pruner(spec),
    )
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(f"study {spec.name!r} in {mask_password(spec.storage)} was created to "
                          f"{study.direction.name.lower()}; the spec says {spec.direction}")
    parent_id = parent_run(spec, spec.name)
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    study.set_user_attr("mlflow_experiment", spec.experiment)
    return study, parent_id


def _work(study: optuna.Study, spec: StudySpec, parent_id: str, log: Callable[[str], None],
          store: mt.Store, data: Prepared | None) -> list[int]:
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
            study.optimize(objective, n_trials=1, catch=(FloatingPointError, _OverBudget), gc_after_trial=True)
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


def _promote(result: SweepResult, spec: StudySpec, best: FrozenTrial | None, stage: str,
             log: Callable[[str], None]) -> None:
    if best is None:
        raise ConfigError(f"study {spec.name!r} has no COMPLETE trial to promote")
    name = spec.registered_model or f"mococxr-{spec.base.backbone}"
    result.registered_model = name
    result.registered_version = promote_best(name, result.best_run_id, int(result.best_epoch), stage,
                                             study_name=spec.name, trial=best.number)
    result.promoted_uri = f"models:/{name}@{stage}"
    log(f"promoted trial {best.number} epoch {result.best_epoch} as {name} version "
        f"{result.registered_version} to {stage}: {mococxr('finetune', '--init', result.promoted_uri)}")


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


__all__ = ["Param", "StudySpec", "SweepResult", "load_spec", "make_objective", "make_storage", "parent_run",
           "parse_spec", "promote_best", "record_study", "run_study", "run_sweep", "trial_config"]
