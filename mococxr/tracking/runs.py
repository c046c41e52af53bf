"""Finding runs by their ``mococxr.*`` tags, the parent run of a study or grid, and promotion.

Studies and grids are re-run and joined by several workers, so nothing here keeps state in the
process: a trial's run, a grid's finished cells and a parent run are all found again in MLflow by
their tags, and a parent created by two workers at once converges on the oldest one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import mlflow
from mlflow.tracking import MlflowClient

from mococxr.tracking import mlflow as mt
from mococxr.tracking import registry


def _where(tags: Mapping[str, str]) -> str:
    return " AND ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def trial_run_id(experiment: str, study_name: str, number: int) -> str | None:
    """The MLflow run of an Optuna trial, found by its tags (used when the worker died before recording it)."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id], _where(mt.tags(optuna_study=study_name, optuna_trial=number, kind="pretrain"))
    )
    return runs[0].info.run_id if runs else None


def finished_hashes(experiment: str) -> dict[str, str]:
    """config hash -> run id of the FINISHED fine-tune runs of an experiment (what a grid may skip)."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"{_where(mt.tags(kind='finetune'))} and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return {r.data.tags.get(mt.tag("config_hash"), ""): r.info.run_id for r in runs}


def open_experiment(name: str, attempts: int = 3) -> str:
    """:func:`mt.ensure_experiment`, retried: workers starting together on a new store race in its
    schema migration and all but one fail once."""
    for attempt in range(attempts):
        try:
            return mt.ensure_experiment(name)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(2 + 2 * attempt)
    raise AssertionError("unreachable")


def parent_run(
    experiment: str,
    *,
    key: Mapping[str, str],
    run_name: str,
    tags: Mapping[str, str] | None = None,
    describe: Callable[[str], None] | None = None,
    running: bool = True,
) -> str:
    """Find or create the one parent run whose tags include ``key``; returns its id.

    ``key`` (e.g. ``mt.tags(kind="sweep", optuna_study=name)``) identifies the parent; ``tags`` are
    added when it is created, and ``describe(run_id)`` then logs its params and artifacts. Workers
    that create one at the same time converge on the oldest and delete their own. ``running``: the
    parent spans its children's work and is set RUNNING again when found (a study, finished by
    whoever completes its budget); otherwise it is created FINISHED and only groups runs (a grid).
    """
    exp_id = mt.ensure_experiment(experiment)
    client = MlflowClient()

    def parents() -> list:
        runs = client.search_runs([exp_id], _where(key), max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = parents()
    if found:
        run_id = found[0].info.run_id
        if running and found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={**key, **(tags or {})})
    run_id = run.info.run_id
    winner = parents()[0].info.run_id
    if winner != run_id:  # another worker created one first
        client.delete_run(run_id)
        return winner
    if describe is not None:
        describe(run_id)
    if not running:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def promote_best(name: str, run_id: str, epoch: int, stage: str, *, study_name: str, trial: int) -> str:
    """Register ``run_id``'s ``epoch`` checkpoint and move it to ``stage``; reuse the version if it holds it."""
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


__all__ = ["finished_hashes", "open_experiment", "parent_run", "promote_best", "trial_run_id"]
