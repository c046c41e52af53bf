"""Optuna plumbing of a study: its RDB storage, the dead-worker handler, the sampler and the pruner.

- Any number of workers given the same study name and storage join one study; Optuna's RDB storage
  (sqlite on one machine, PostgreSQL for many) is the work queue.
- A worker killed mid-trial leaves a RUNNING trial whose heartbeat stops. After the grace period the
  next worker to look marks it FAIL (optuna runs ``fail_stale_trials`` before each trial) and
  ``RetryHeartbeatStaleTrialCallback`` queues a copy with the same parameters, which the next free
  worker runs. The dead trial's MLflow run is marked FAILED at that moment.
- Each trial's draw is seeded from ``(seed, trial number)``: a study replays the same way from the same
  history, and concurrent workers never draw the same point because trial numbers are unique.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mococxr.errors import ConfigError
from mococxr.sweep.spec import Heartbeat, StudySpec, mask_password
from mococxr.tracking import mlflow as mt
from mococxr.tracking.runs import trial_run_id


def storage_url(spec: StudySpec) -> str:
    """The spec's storage, else the Optuna database beside the MLflow store in force."""
    return spec.storage or mt.current_store().optuna_storage


def make_storage(spec: StudySpec) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats, so a dead worker's trial is failed and retried with the same params."""
    return rdb_storage(
        storage_url(spec), spec.heartbeat, on_stale=trial_run_failer(spec.experiment, "pretrain")
    )


def rdb_storage(
    url: str,
    heartbeat: Heartbeat,
    *,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url`` with ``heartbeat``: a trial whose worker stops beating for the grace
    period is FAIL, ``on_stale`` is told (e.g. to fail its MLflow run) and a copy is queued again."""
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise ConfigError(
            f"storage {mask_password(url)!r}: use sqlite:///PATH for one machine or "
            "postgresql://USER:PASSWORD@HOST/DB for several"
        )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers share one file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry)
        for attempt in range(3):  # workers starting together on a new database race to create its tables
            try:
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat.interval,
                    grace_period=heartbeat.grace,
                    heartbeat_stale_trial_callback=_StaleTrialHandler(retry, on_stale),
                )
                if url.startswith("sqlite:"):
                    _serializable_sqlite(storage.engine)
                return storage
            except Exception as exc:  # unreachable server, bad credentials, missing driver
                if attempt == 2:
                    raise ConfigError(f"cannot open optuna storage {mask_password(url)!r}: {exc}") from None
                time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _serializable_sqlite(engine: Any) -> None:
    """Make every sqlite transaction ``BEGIN IMMEDIATE`` (SQLAlchemy's pysqlite recipe).

    pysqlite starts transactions lazily, so two workers can both read a trial WAITING and both move it
    to RUNNING: measured, 4 workers on 24 items worked some twice. With ``BEGIN IMMEDIATE`` a
    transaction holds the write lock from its first read, so popping a trial is atomic on one machine
    as ``SELECT ... FOR UPDATE`` makes it on PostgreSQL (others wait, up to the 60 s busy timeout)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed are not reused


def trial_run_failer(experiment: str, kind: str) -> Callable[[optuna.Study, FrozenTrial], None]:
    """``on_stale`` for trials that each run in one MLflow run: mark that run FAILED."""

    def fail_run(study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id") or trial_run_id(
            experiment, study.study_name, trial.number, kind=kind
        )
        if run_id:
            client = MlflowClient()
            # status read and set back to back: a worker only judged dead (still alive) that finishes its
            # run at this instant is sorted out by the grid (sweep/grid.py: _lease_lost)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
                client.set_tag(run_id, mt.tag("end_reason"), "its worker stopped sending heartbeats")
            client.set_tag(run_id, mt.tag("optuna_state"), TrialState.FAIL.name)
        print(
            f"{study.study_name}: trial {trial.number}'s worker stopped sending heartbeats; marked FAIL"
            + (f" (MLflow run {run_id} FAILED)" if run_id else "")
            + ", queued a retry",
            flush=True,
        )

    return fail_run


class _StaleTrialHandler:
    """Lets optuna queue the retry of a dead worker's trial (same params), then tells ``on_stale``."""

    def __init__(
        self,
        retry: Callable[[optuna.Study, FrozenTrial], None],
        on_stale: Callable[[optuna.Study, FrozenTrial], None] | None,
    ) -> None:
        self.retry = retry
        self.on_stale = on_stale

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)  # first: the copy follows the FAIL as closely as it can (queue.wait)
        if self.on_stale is not None:
            try:
                self.on_stale(study, trial)
            except Exception as exc:  # noqa: BLE001 - the retry matters more than the courtesy
                print(f"{study.study_name}: trial {trial.number}: could not mark its run: {exc}", flush=True)


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
    sampler = spec.sampler
    if sampler.name == "grid":
        # One GridSampler for the whole study, never re-seeded per trial: Optuna 5 maps a trial's
        # grid_id through an order drawn from the seed, so a re-seeded sampler repeats grid points.
        grid = {k: p.grid_values() for k, p in spec.search_space.items()}
        return optuna.samplers.GridSampler(grid, seed=sampler.seed)
    if sampler.name == "random":
        return _PerTrialSeed(lambda s: optuna.samplers.RandomSampler(seed=s), sampler.seed)
    return _PerTrialSeed(
        lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=sampler.n_startup_trials), sampler.seed
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner.name == "none":
        return optuna.pruners.NopPruner()
    if spec.pruner.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**spec.pruner.args)
    args = {"n_startup_trials": 2, "n_warmup_steps": 0, **spec.pruner.args}
    return optuna.pruners.MedianPruner(**args)


def study_budget(spec: StudySpec) -> int:
    """Finished trials the study aims for: ``n_trials``, or fewer when a grid has fewer points."""
    if spec.sampler.name != "grid":
        return spec.n_trials
    return min(spec.n_trials, math.prod(len(p.choices) for p in spec.search_space.values()))


__all__ = [
    "make_pruner",
    "make_sampler",
    "make_storage",
    "rdb_storage",
    "storage_url",
    "study_budget",
    "trial_run_failer",
]
