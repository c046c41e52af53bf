"""Finding runs by their ``mococxr.*`` tags: a trial's run, a grid's finished cells, a parent's children.

Nothing here coordinates work: who runs what is decided by the work queue (Optuna's storage, see
:mod:`mococxr.sweep.queue`). MLflow holds the results, so a worker asks it what is already done (a
FINISHED cell is adopted, never trained again) and which run belongs to a trial whose worker died.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import mlflow
from mlflow.tracking import MlflowClient

from mococxr.tracking import filters as flt
from mococxr.tracking import mlflow as mt


def _experiment_id(experiment: str) -> str | None:
    exp = MlflowClient().get_experiment_by_name(experiment)
    return None if exp is None else exp.experiment_id


def trial_run_id(experiment: str, study_name: str, number: int, *, kind: str = "pretrain") -> str | None:
    """The MLflow run of an Optuna trial (a pretraining trial, or a grid cell's lease: ``kind="finetune"``),
    found by its tags; used when the worker died before recording it."""
    exp_id = _experiment_id(experiment)
    if exp_id is None:
        return None
    found = MlflowClient().search_runs(
        [exp_id], flt.tags(mt.tags(optuna_study=study_name, optuna_trial=number, kind=kind))
    )
    return found[0].info.run_id if found else None


def finished_hashes(experiment: str) -> dict[str, str]:
    """config hash -> run id of the FINISHED fine-tune runs of an experiment (what a grid adopts)."""
    exp_id = _experiment_id(experiment)
    if exp_id is None:
        return {}
    found = mlflow.search_runs(
        [exp_id],
        filter_string=flt.both(flt.tags(mt.tags(kind="finetune")), flt.status("FINISHED")),
        output_format="list",
    )
    return {r.data.tags.get(mt.tag("config_hash"), ""): r.info.run_id for r in found}


def finished_run(experiment: str, cfg_hash: str) -> mlflow.entities.Run | None:
    """The oldest FINISHED fine-tune run of ``cfg_hash`` in ``experiment``, if any."""
    exp_id = _experiment_id(experiment)
    if exp_id is None:
        return None
    found = MlflowClient().search_runs(
        [exp_id],
        flt.both(flt.tags(mt.tags(kind="finetune", config_hash=cfg_hash)), flt.status("FINISHED")),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return found[0] if found else None


def running_children(parent_run_id: str) -> list[mlflow.entities.Run]:
    """The RUNNING runs under ``parent_run_id``."""
    client = MlflowClient()
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [exp_id],
        flt.both(flt.tag("mlflow.parentRunId", parent_run_id), flt.status("RUNNING")),
    )


def end_run(run_id: str, status: str, reason: str) -> None:
    """End ``run_id`` with ``status`` and ``mococxr.end_reason`` if it is still RUNNING."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, mt.tag("end_reason"), reason[:500])
        client.set_terminated(run_id, status)


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


def create_parent(experiment: str, *, run_name: str, tags: Mapping[str, str], running: bool = True) -> str:
    """Create a parent run (called once, by the worker that set its study or queue up)."""
    from mlflow.tracking.context.registry import resolve_tags

    client = MlflowClient()
    run = client.create_run(open_experiment(experiment), run_name=run_name, tags=resolve_tags(dict(tags)))
    if not running:
        client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def end_parent(run_id: str, status: str) -> None:
    """End a parent run where its last child ended, so that it spans its children's work.

    A re-run reopens its parent (:func:`reopen`); ending it at "now" would stretch its duration over every
    pause between calls (a grid re-run that only adopted finished cells made a 29-minute grid read 36
    minutes). With no child ended yet, the parent ends now."""
    client = MlflowClient()
    run = client.get_run(run_id)
    last = client.search_runs(
        [run.info.experiment_id],
        flt.both(flt.tag("mlflow.parentRunId", run_id), flt.ended()),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    end = last[0].info.end_time if last else int(time.time() * 1000)
    client.set_terminated(run_id, status, end_time=max(end, run.info.start_time or 0))


def reopen(run_id: str) -> None:
    """Set a parent run RUNNING again (a re-run or a late worker continues its work)."""
    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


__all__ = [
    "create_parent",
    "end_parent",
    "end_run",
    "finished_hashes",
    "finished_run",
    "open_experiment",
    "reopen",
    "running_children",
    "trial_run_id",
]
