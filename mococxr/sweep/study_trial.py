"""One pretraining trial of a study: the objective (pretrain, report each epoch, prune) and its records."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mococxr.config import PretrainConfig, override
from mococxr.data.prepare import Prepared
from mococxr.errors import ConfigError
from mococxr.sweep.spec import StudySpec
from mococxr.sweep.storage import study_budget
from mococxr.tracking import mlflow as mt
from mococxr.tracking import runs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class _OverBudget(Exception):
    """Another worker claimed the last slot of the budget between our count and our ask."""


def trial_config(spec: StudySpec, params: Mapping[str, Any], study_name: str, number: int) -> PretrainConfig:
    cfg = override(spec.base, dict(params))
    return replace(
        cfg,
        monitor=True,
        epochs=spec.epochs,
        experiment=spec.experiment,
        run_name=f"{study_name}-trial{number:03d}",
    )


def make_objective(
    spec: StudySpec,
    study_name: str,
    parent_run_id: str,
    started: list[int] | None = None,
    *,
    data: Prepared | None = None,
    store: mt.Store | None = None,
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
            result = pretrain(
                cfg,
                data=data,
                store=store,
                parent_run_id=parent_run_id,
                on_epoch_end=_reporter(trial, spec, box),
                progress=True,  # a line every 10 s in a log (a bar on a terminal): never silent
                extra_tags=mt.tags(optuna_study=study_name, optuna_trial=trial.number),
            )
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
            raise ConfigError(
                f"{spec.source}: objective.metric {spec.metric!r} is not logged; the monitor "
                f"logs {sorted(k for k in metrics if k.startswith('val/'))}"
            )
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
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.heartbeat.max_retry)(
            trial.study, frozen
        )


__all__ = ["FINISHED", "make_objective", "trial_config"]
