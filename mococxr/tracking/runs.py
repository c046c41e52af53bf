"""Finding runs by their ``mococxr.*`` tags, run ownership (claims, dead owners), parent runs, promotion.

Studies and grids are re-run and joined by several workers, so nothing here keeps state in the
process: a trial's run, a grid's finished cells and a parent run are all found again in MLflow by
their tags, and a parent created by two workers at once converges on the oldest one.

**One writer per grid cell.** A cell is claimed in the tracking store itself, so the rule holds for
processes on one machine (sqlite) and on many (a shared ``mlflow server``) alike, with no second
database: :func:`claim_run` creates the cell's run RUNNING, tagged with the cell's key (its config
hash), its owner (``host:pid``) and ``mococxr.claim=pending``; it then lists the cell's runs:

1. a FINISHED run, or a live RUNNING run that is ``won`` or older than ours (``(start_time, run_id)``,
   the parent rule): we lose, delete our run and move on;
2. else we tag ours ``won``, wait ``MOCOCXR_CLAIM_SETTLE_S`` (default 1 s) and list again: a ``won``
   run older than ours means two claimants confirmed at once (each listed before the other's tag was
   visible); the same order on both sides keeps exactly one.

MLflow offers no compare-and-set, so this is safe when a store write becomes visible within the
settle time; ``start_time`` comes from each client's clock, but clock skew only changes *who* wins,
since a confirmed claim is never overtaken by a pending one. Measured on sqlite (2 busy cores): three
processes claiming the same cells at the same instant got exactly one winner for each of 10 cells
(and of 20 with a settle of 0 and 0.2 s: sqlite serialises writes); a won claim took 1.3-1.8 s, 1 s
of it the settle (nothing beside minutes of fine-tuning), a lost one 0.05-0.4 s.
Optuna's RDB storage (the grid's cells as enqueued trials) was the alternative; it coordinates
atomically but needs a shared SQL database beside the tracking server, and a cell's state would
then live in two stores that can disagree.

**Dead owners.** Every run a command starts carries ``mococxr.owner`` and a ``mococxr.heartbeat``
refreshed by a thread (:func:`mococxr.tracking.mlflow.start_run`). A RUNNING run is stale when its
owner is on this host and its process is gone, or its heartbeat is older than
``MOCOCXR_STALE_AFTER_S`` (default 300 s). Whoever meets a stale run marks it FAILED with a
``mococxr.end_reason``, and the cell is claimed again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mococxr.errors import TrackingError
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
        [exp.experiment_id],
        filter_string=f"{_where(mt.tags(kind='finetune'))} and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return {r.data.tags.get(mt.tag("config_hash"), ""): r.info.run_id for r in runs}


STALE_ENV = "MOCOCXR_STALE_AFTER_S"
SETTLE_ENV = "MOCOCXR_CLAIM_SETTLE_S"


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, str(default))
    try:
        return float(raw)
    except ValueError:
        raise TrackingError(f"{env}={raw!r}: expected a number of seconds") from None


def stale_after() -> float:
    """Seconds without a heartbeat after which a RUNNING run counts as dead (``MOCOCXR_STALE_AFTER_S``)."""
    return _seconds(STALE_ENV, 300.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a killed child its parent has not reaped yet is a zombie: gone
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(run: Run, grace: float | None = None) -> str | None:
    """Why the RUNNING ``run`` has no live owner (see the module docstring), or ``None`` while it has one."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    owner = tags.get(mt.tag("owner"), "")
    host, _, pid = owner.rpartition(":")
    if host == os.uname().nodename and pid.isdigit() and not _pid_alive(int(pid)):
        return f"its owner {owner} is gone"
    try:
        beat = float(tags[mt.tag("heartbeat")])
    except (KeyError, ValueError):
        beat = run.info.start_time / 1000  # a run from before heartbeats: judged by its age
    age = time.time() - beat
    grace = stale_after() if grace is None else grace
    if age > grace:
        return f"no heartbeat from {owner or 'its owner'} for {age:.0f} s (more than {grace:g} s)"
    return None


def mark_stale(run: Run, reason: str) -> None:
    """Mark a dead owner's run FAILED, saying why and who found it."""
    client = MlflowClient()
    client.set_tag(run.info.run_id, mt.tag("end_reason"), f"owner died: {reason}; found by {mt.owner_id()}")
    client.set_terminated(run.info.run_id, "FAILED")


def cell_runs(
    experiment: str, key: Mapping[str, str], *, fix_stale: bool = True, grace: float | None = None
) -> tuple[list[Run], list[Run]]:
    """(FINISHED runs, live RUNNING runs) whose tags include ``key``, oldest first. Stale RUNNING runs
    are marked FAILED on the way (``fix_stale``) or just left out (a dry run writes nothing)."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return [], []
    found = MlflowClient().search_runs([exp.experiment_id], _where(key), max_results=1000)
    found = sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))
    live = []
    for run in (r for r in found if r.info.status == "RUNNING"):
        reason = is_stale(run, grace)
        if reason is None:
            live.append(run)
        elif fix_stale:
            mark_stale(run, reason)
    return [r for r in found if r.info.status == "FINISHED"], live


def _holder(
    mine: str, start: tuple[int, str], finished: list[Run], live: list[Run], *, pending: bool
) -> Run | None:
    """The run that beats our claim ``mine``: a finished one, a confirmed one, or (``pending``) an older one."""
    if finished:
        return finished[0]
    for run in live:
        if run.info.run_id == mine:
            continue
        won = run.data.tags.get(mt.tag("claim"), "won") == "won"  # runs without the tag are someone's work
        older = (run.info.start_time, run.info.run_id) < start
        if (won and (pending or older)) or (pending and older):
            return run
    return None


def claim_run(
    experiment: str,
    key: Mapping[str, str],
    *,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> tuple[str | None, Run | None]:
    """Claim the work ``key`` names (see the module docstring): ``(our run id, None)`` if we own it now,
    else ``(None, the run that holds it)``. Our run is RUNNING; the caller resumes it with
    :func:`mococxr.tracking.mlflow.claimed_run` and must end it."""
    finished, live = cell_runs(experiment, key)
    holder = _holder("", (1 << 62, ""), finished, live, pending=True)
    if holder is not None:
        return None, holder
    client = MlflowClient()
    extra = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
    run = client.create_run(
        mt.ensure_experiment(experiment),
        run_name=run_name,
        tags=resolve_tags(
            {
                **tags,
                **key,
                **extra,
                **mt.tags(owner=mt.owner_id(), heartbeat=int(time.time()), claim="pending"),
            }
        ),
    )
    mine, start = run.info.run_id, (run.info.start_time, run.info.run_id)
    try:
        for pending in (True, False):
            holder = _holder(mine, start, *cell_runs(experiment, key), pending=pending)
            if holder is not None:
                client.delete_run(mine)
                return None, holder
            if pending:
                client.set_tag(mine, mt.tag("claim"), "won")
                time.sleep(_seconds(SETTLE_ENV, 1.0))
    except BaseException:  # interrupted while claiming: the claim holds no work, withdraw it
        client.delete_run(mine)
        raise
    return mine, None


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
    run = client.create_run(exp_id, run_name=run_name, tags=resolve_tags({**key, **(tags or {})}))
    run_id = run.info.run_id
    time.sleep(_seconds(SETTLE_ENV, 1.0))  # let a parent created at the same time become visible (see top)
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
    if (
        holder is not None
        and holder.tags.get(mt.TAG_PREFIX + "run_id") == run_id
        and holder.tags.get(mt.tag("checkpoint_epoch")) == str(epoch)
    ):
        return str(holder.version)  # another worker of this study promoted it already
    version = registry.register(
        name, run_id=run_id, epoch=epoch, extra_tags=mt.tags(optuna_study=study_name, optuna_trial=trial)
    )
    registry.promote(name, version, stage)
    return version


__all__ = [
    "cell_runs",
    "claim_run",
    "finished_hashes",
    "is_stale",
    "mark_stale",
    "stale_after",
    "open_experiment",
    "parent_run",
    "promote_best",
    "trial_run_id",
]
