"""The paper's fine-tune grid in one command: inits x protocols x label fractions x draws.

A grid is a YAML file (see ``sweeps/finetune_grid.yaml``), validated by :func:`mococxr.sweep.spec.load_grid`::

    experiment: mococxr-chexpert-effusion
    base:                      # a FinetuneConfig mapping shared by every run
      data: {dataset: chexpert, root: data/CheXpert, test_csv: CheXpert-v1.0-small/valid.csv}
      backbone: resnet18
    inits: {random: random, imagenet: imagenet, moco: "models:/mococxr-resnet18@production"}
    protocols: [linear, e2e]
    fractions: [0.001, 0.01, 0.1, 1.0]
    draws: {0.001: 5, 0.01: 5, 0.1: 3, 1.0: 1}   # or one number for every fraction

All runs hang under one parent run, which is RUNNING while cells run and ends FINISHED (every cell
finished), FAILED (some did not) or KILLED (interrupted) with the counts as metrics and a description.
Re-running is idempotent: a run whose config hash matches a FINISHED run of the experiment is skipped,
failed ones are redone. Registry references such as ``models:/NAME@production`` are pinned to a
version before hashing, so promoting a new checkpoint makes new runs instead of silently reusing old
ones. The data is read and split once for the whole grid, so every cell is scored on one test set.

Several ``mococxr grid`` processes (or plans, or demos) may run one grid on one store at once, on one
machine or many: the cells are the items of one work queue in Optuna's storage (:mod:`mococxr.sweep.queue`;
``storage`` in the spec, by default the store's Optuna database), enqueued once and popped atomically, so
a cell has one worker at a time; a worker that dies is noticed by its missing heartbeat and its cell
handed to the next. A cell whose MLflow run FINISHED (this grid's, or another grid's with the same
config) is adopted, never trained again. Each worker returns once no cell is waiting or running in any
worker (the barrier a plan's next stage needs). ``dry_run`` writes nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mococxr.config import FinetuneConfig, config_hash
from mococxr.data.prepare import Prepared, prepare
from mococxr.errors import ConfigError
from mococxr.sweep.grid_spec import GridSpec, load_grid
from mococxr.sweep.queue import Item, Lease, WorkQueue
from mococxr.sweep.spec_common import Heartbeat
from mococxr.sweep.storage import rdb_storage, trial_run_failer
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import runs
from mococxr.tracking.registry import canonical_uri, version_info

Trainer = Callable[..., Any]  # finetune(cfg, *, data, store, parent_run_id, progress, extra_tags) -> result


def pin_init(init: str) -> str:
    """``models:/NAME@alias`` (or ``/Stage``) -> ``models:/NAME/<version>`` it points to now."""
    if not init.startswith("models:/"):
        return init
    info = version_info(canonical_uri(init))
    if info.get("registry_version"):
        return f"models:/{info['registered_model']}/{info['registry_version']}"
    return init


@dataclass
class GridResult:
    parent_run_id: str  # "" for a dry run on a grid never run
    run_ids: list[str] = field(default_factory=list)  # every finished cell's run, in grid order
    started: int = 0  # cells this call trained
    skipped: int = 0  # cells finished before this call, or adopted from a FINISHED run
    failed: list[str] = field(default_factory=list)
    elsewhere: int = 0  # cells other workers finished during this call
    would_run: int = 0  # dry run: cells neither finished nor running
    total: int = 0


def describe_grid(spec: GridSpec, counts: str = "") -> str:
    """The parent run's description (``mlflow.note.content``): what the grid is and how to re-run it."""
    draws = ", ".join(f"{f:g}: {spec.draws[f]}" for f in spec.fractions)
    inits = ", ".join(f"{label} = {init}" for label, init in spec.inits.items())
    n = len(spec.configs())
    return (
        f"Fine-tune grid **{spec.name}**: {n} runs = inits ({inits}) x protocols "
        f"({', '.join(spec.protocols)}) x label fractions with draws ({draws}), backbone "
        f"{spec.base.backbone}, dataset {spec.base.data.dataset}, task {spec.base.data.task}. {counts}"
        "\n\nRe-run it with the same `mococxr grid SPEC.yaml` (or plan) command: finished cells are kept, "
        "failed or missing ones run. "
        "Start the same command on more machines to add workers: the cells are one work queue in Optuna's "
        "storage, each cell has one worker at a time."
    )


def queue_name(spec: GridSpec, spec_hash: str) -> str:
    """The grid's work queue (an Optuna study): one per grid name and cell set."""
    return f"{spec.name}.cells.{spec_hash[:12]}"


def _create_parent(spec: GridSpec, spec_hash: str) -> str:
    """The grid's parent run, made once by the worker that sets its queue up."""
    base = spec.base
    parent = runs.create_parent(
        spec.experiment,
        run_name=f"grid-{spec.name}",
        tags={
            **mt.tags(kind="grid", config_hash=spec_hash),
            **mt.tags(dataset=base.data.dataset, task=base.data.task, backbone=base.backbone, grid=spec.name),
            mt.NOTE_TAG: describe_grid(spec),
        },
    )
    grid = {"inits": spec.inits, "protocols": spec.protocols, "fractions": spec.fractions}
    ma.log_json({**grid, "draws": spec.draws, "epochs": spec.epochs}, "grid.json", run_id=parent)
    return parent


def _item(label: str, cfg: FinetuneConfig) -> dict[str, Any]:
    return {"init": label, "protocol": cfg.protocol, "fraction": cfg.fraction, "draw": cfg.draw}


@dataclass
class _Cells:
    """What a worker needs to run the grid's cells: by key (config hash), their order, the shared data."""

    spec: GridSpec
    by_key: dict[str, tuple[str, FinetuneConfig]]
    store: mt.Store
    progress: bool
    train: Trainer | None
    data: Prepared | None = None

    def head(self, key: str) -> str:
        label, cfg = self.by_key[key]
        return _head(list(self.by_key).index(key) + 1, len(self.by_key), label, cfg)


def run_grid(
    spec: GridSpec,
    *,
    dry_run: bool = False,
    progress: bool = True,
    store: mt.Store | None = None,
    data: Prepared | None = None,
    train: Trainer | None = None,
    say: Callable[[str], None] = print,
) -> GridResult:
    """Work on the grid until no cell is left in any worker; returns what ran, was kept and failed.

    ``store`` is the MLflow store (the one in force when not given); ``data`` the base data already
    prepared by the caller (else prepared at the first cell this worker runs). ``train`` replaces
    :func:`mococxr.train.finetune.finetune` and is handed ``data`` as given (benchmarks only: see
    benchmarks/queue_scale). ``dry_run`` prints what would run and
    writes nothing.
    """
    if data is not None and data.config != spec.base.data:
        raise ConfigError(
            f"grid {spec.name}: the prepared data is for {data.config}, the grid's base is {spec.base.data}"
        )
    store = mt.current_store(store)
    spec = replace(spec, inits={label: pin_init(init) for label, init in spec.inits.items()})
    by_key = {config_hash(cfg): (label, cfg) for label, cfg in spec.configs()}
    spec_hash = _sha(spec.name + ":" + ",".join(by_key))
    storage = spec.storage or store.optuna_storage
    if dry_run:
        return _dry_run(spec, by_key, storage, queue_name(spec, spec_hash))
    queue = WorkQueue.open(
        queue_name(spec, spec_hash),
        storage,
        [Item(key, _item(label, cfg)) for key, (label, cfg) in by_key.items()],
        heartbeat=spec.heartbeat,
        setup=lambda: {"mlflow_parent_run_id": _create_parent(spec, spec_hash)},
        on_stale=trial_run_failer(spec.experiment, "finetune"),
        say=say,
    )
    parent = queue.attrs["mlflow_parent_run_id"]
    runs.reopen(parent)
    result = GridResult(parent_run_id=parent, total=len(by_key))
    before = sum(t.state == TrialState.COMPLETE for t in queue.items().values())
    result.skipped = before
    if before:
        say(f"grid {spec.name}: {before} of {len(by_key)} cells finished before, kept")
    cells = _Cells(spec, by_key, store, progress, train, data)
    try:
        # until no cell waits or runs in any worker; a dead worker's cell that comes back is taken here
        while (lease := queue.pop()) is not None or not queue.wait(say, what="cell"):
            if lease is not None:
                _run_cell(cells, queue, lease, result, say)
    except BaseException as exc:
        try:
            _close(cells, queue, result, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    _close(cells, queue, result, "FINISHED")
    return result


def _head(i: int, n: int, label: str, cfg) -> str:
    """The start of a cell's progress line: ``[3/32]   moco linear fraction 0.1 draw 1``."""
    return f"[{i}/{n}] {label:>8} {cfg.protocol:>6} fraction {cfg.fraction:g} draw {cfg.draw}"


def _run_cell(cells: _Cells, queue: WorkQueue, lease: Lease, result: GridResult, say) -> None:
    """Adopt the leased cell's FINISHED run, or fine-tune it; a failed cell is recorded, not raised."""
    spec, head = cells.spec, cells.head(lease.key)
    label, cfg = cells.by_key[lease.key]
    done = runs.finished_run(spec.experiment, lease.key)
    if done is not None:  # trained before (by a worker that died before telling the queue, or another grid)
        lease.done(done.data.metrics.get("test/auc"), done.info.run_id, adopted=True)
        result.skipped += 1
        say(f"{head}: finished before (run {done.info.run_id[:8]}), adopted")
        return
    if cells.train is None:
        from mococxr.train.finetune import finetune

        cells.train = finetune
        cells.data = cells.data or prepare(spec.base.data)  # one split for the whole grid: one test set
    tags = mt.tags(grid=spec.name, init=label, optuna_study=queue.name, optuna_trial=lease.number)
    t0 = time.perf_counter()
    try:
        res = cells.train(
            cfg,
            data=cells.data,
            store=cells.store,
            parent_run_id=result.parent_run_id,
            progress=cells.progress,
            extra_tags=tags,
        )
    except KeyboardInterrupt:
        lease.requeue("interrupted (Ctrl-C or SIGTERM); queued again")
        raise
    except Exception as exc:  # one failed cell must not lose the others; re-running redoes it
        lease.failed(f"{type(exc).__name__}: {exc}")
        result.failed.append(f"{head}: {exc.__class__.__name__}: {exc}")
        say(f"{head}: FAILED ({exc})")
        return
    auc = res.test.get("test/auc", float("nan"))
    if not lease.done(auc, res.run_id):
        _lease_lost(queue, lease, res.run_id, head, say)
        return
    result.started += 1
    say(f"{head}: test AUC {auc:.4f} (best epoch {res.best_epoch}, {time.perf_counter() - t0:.0f} s)")


def _lease_lost(queue: WorkQueue, lease: Lease, run_id: str, head: str, say) -> None:
    """This worker was judged dead while it trained (a pause longer than the heartbeat grace period) and a
    copy of the cell was queued. The cell's result is the run its COMPLETE trial names: wait for the copy,
    keep our run if the copy adopted it, else mark ours FAILED, so a cell never has two FINISHED runs."""
    while (t := queue.items().get(lease.key)) is not None and t.state in (
        TrialState.WAITING,
        TrialState.RUNNING,
    ):
        time.sleep(queue.heartbeat.interval)
    if t is not None and t.state == TrialState.COMPLETE and t.user_attrs.get("mlflow_run_id") == run_id:
        say(f"{head}: this worker's lease was lost while it trained, but its run {run_id[:8]} was adopted")
        return
    client = MlflowClient()
    client.set_tag(run_id, mt.tag("end_reason"), "duplicate: the cell was handed to another worker")
    client.set_terminated(run_id, "FAILED")
    other = "" if t is None else t.user_attrs.get("mlflow_run_id", "")
    say(
        f"{head}: this worker was judged dead while it trained; run {run_id[:8]} marked FAILED"
        + (f", the cell's result is run {other[:8]}" if other else "")
    )


def _close(cells: _Cells, queue: WorkQueue, result: GridResult, status: str) -> None:
    """Summarise the whole grid (every worker's cells) on its parent run; end it unless cells still run."""
    items, counts = queue.items(), queue.counts()
    result.run_ids = [
        items[k].user_attrs.get("mlflow_run_id", "")
        for k in cells.by_key
        if k in items and items[k].state == TrialState.COMPLETE
    ]
    result.elsewhere = max(0, counts["complete"] - result.started - result.skipped)
    mine = {f.split(":", 1)[0] for f in result.failed}
    for key, t in items.items():
        head = cells.head(key) if key in cells.by_key else key
        if t.state == TrialState.FAIL and head not in mine:
            reason = t.user_attrs.get("fail_reason", "failed")
            result.failed.append(f"{head}: in worker {t.user_attrs.get('worker', '?')}: {reason}")
    live = counts["running"] + counts["waiting"]
    if status == "FINISHED" and counts["complete"] < len(cells.by_key):
        status = "FAILED"
    now = int(time.time() * 1000)
    values = {
        "n_cells": len(cells.by_key),
        "n_finished": counts["complete"],
        "n_failed": counts["fail"],
        "n_running": live,
        "n_started": result.started,
    }
    client = MlflowClient()
    parent = result.parent_run_id
    client.log_batch(parent, metrics=[Metric(f"grid/{k}", v, now, 0) for k, v in values.items()])
    state = f"{live} cell(s) still queued or running in other workers" if live else f"ended {status}"
    done = f"{counts['complete']} of {len(cells.by_key)} cells finished; {state}."
    client.set_tag(parent, mt.NOTE_TAG, describe_grid(cells.spec, done))
    if not live:
        runs.end_parent(parent, status)


def _running(storage: str, name: str) -> dict[str, str]:
    """key -> worker of the cells RUNNING in the grid's queue, read only (no queue yet: none)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return {}
    try:
        study = optuna.load_study(study_name=name, storage=rdb_storage(storage, Heartbeat()))
    except KeyError:
        return {}
    return {
        t.user_attrs.get("key", ""): t.user_attrs.get("worker", "another worker")
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    }


def _dry_run(spec: GridSpec, by_key: dict, storage: str, name: str) -> GridResult:
    """Print each cell's state (finished, running in a worker, would run); read the store, write nothing."""
    result = GridResult(parent_run_id="", total=len(by_key))
    done = runs.finished_hashes(spec.experiment)
    running = _running(storage, name)
    for i, (key, (label, cfg)) in enumerate(by_key.items(), 1):
        head = _head(i, len(by_key), label, cfg)
        if key in done:
            result.skipped += 1
            result.run_ids.append(done[key])
            print(f"{head}: finished (run {done[key][:8]}), would skip", flush=True)
        elif key in running:
            result.elsewhere += 1
            print(f"{head}: running in {running[key]}", flush=True)
        else:
            result.would_run += 1
            print(f"{head}: would run", flush=True)
    print(
        f"dry run of grid {spec.name}: {result.would_run} of {len(by_key)} cells would run, {result.skipped} "
        f"finished, {result.elsewhere} running elsewhere; nothing was written to the store",
        flush=True,
    )
    return result


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["GridResult", "GridSpec", "describe_grid", "load_grid", "pin_init", "queue_name", "run_grid"]
