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

Several ``mococxr grid`` processes (or demos) may run one grid on one store at once, on one machine or
through a shared tracking server: each cell is claimed in the store before it runs (see
:mod:`mococxr.tracking.runs`), so a cell has one writer; a process skips the cells others hold and
takes over a cell whose owner died, marking the dead run FAILED. ``dry_run`` writes nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE as NOTE

from mococxr.config import config_hash
from mococxr.data.prepare import Prepared, prepare
from mococxr.errors import ConfigError
from mococxr.sweep.spec import GridSpec, load_grid
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import runs
from mococxr.tracking.registry import canonical_uri, version_info


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
    run_ids: list[str] = field(default_factory=list)
    started: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    elsewhere: int = 0  # cells another live process holds
    would_run: int = 0  # dry run: cells neither finished nor held elsewhere
    total: int = 0


def describe_grid(spec: GridSpec, counts: str = "") -> str:
    """The parent run's description (``mlflow.note.content``): what the grid is and how to re-run it."""
    draws = ", ".join(f"{f:g}: {spec.draws[f]}" for f in spec.fractions)
    inits = ", ".join(f"{label} = {init}" for label, init in spec.inits.items())
    n = len(spec.configs())
    return (
        f"Fine-tune grid **{spec.name}**: {n} runs = inits ({inits}) x protocols ({', '.join(spec.protocols)})"
        f" x label fractions with draws ({draws}), backbone {spec.base.backbone}, dataset "
        f"{spec.base.data.dataset}, task {spec.base.data.task}. {counts}\n\nRe-run it with the same "
        "`mococxr grid SPEC.yaml` (or demo) command: finished cells are skipped, failed or missing ones run; "
        "several processes may run it at once, each cell has one owner."
    )


def parent_run(spec: GridSpec, spec_hash: str) -> str:
    """Find or create the grid's parent run (one per grid name and spec) and set it RUNNING."""
    base = spec.base

    def describe(run_id: str) -> None:
        ma.log_json(
            {
                "inits": spec.inits,
                "protocols": spec.protocols,
                "fractions": spec.fractions,
                "draws": spec.draws,
                "epochs": spec.epochs,
            },
            "grid.json",
            run_id=run_id,
        )

    return runs.parent_run(
        spec.experiment,
        key=mt.tags(kind="grid", config_hash=spec_hash),
        run_name=f"grid-{spec.name}",
        tags={
            **mt.tags(dataset=base.data.dataset, task=base.data.task, backbone=base.backbone, grid=spec.name),
            NOTE: describe_grid(spec),
        },
        describe=describe,
        running=True,
    )


def run_grid(
    spec: GridSpec,
    *,
    dry_run: bool = False,
    progress: bool = True,
    store: mt.Store | None = None,
    data: Prepared | None = None,
) -> GridResult:
    """Run every missing cell of the grid; returns what ran, what was skipped and what failed.

    ``store`` is the MLflow store (the one in force when not given); ``data`` the base data already
    prepared by the caller (else prepared at the first cell that runs). ``dry_run`` prints what would
    run and writes nothing to the store.
    """
    if data is not None and data.config != spec.base.data:
        raise ConfigError(
            f"grid {spec.name}: the prepared data is for {data.config}, the grid's base is {spec.base.data}"
        )
    store = mt.current_store(store)
    spec = replace(spec, inits={label: pin_init(init) for label, init in spec.inits.items()})
    jobs = spec.configs()
    spec_hash = _sha(spec.name + ":" + ",".join(config_hash(c) for _, c in jobs))
    if dry_run:
        return _dry_run(spec, jobs)
    result = GridResult(parent_run_id=parent_run(spec, spec_hash), total=len(jobs))
    done = runs.finished_hashes(spec.experiment)
    try:
        for i, (label, cfg) in enumerate(jobs, 1):
            head, h = _head(i, len(jobs), label, cfg), config_hash(cfg)
            if h in done:
                result.skipped += 1
                result.run_ids.append(done[h])
                print(f"{head}: finished before (run {done[h][:8]}), skipped", flush=True)
                continue
            if data is None:
                data = prepare(spec.base.data)  # one split for the whole grid: one test set
            _run_cell(spec, label, cfg, h, head, result, data=data, store=store, progress=progress)
    except BaseException as exc:
        try:
            _close(spec, jobs, result, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    _close(spec, jobs, result, "FINISHED")
    return result


def _head(i: int, n: int, label: str, cfg) -> str:
    """The start of a cell's progress line: ``[3/32]   moco linear fraction 0.1 draw 1``."""
    return f"[{i}/{n}] {label:>8} {cfg.protocol:>6} fraction {cfg.fraction:g} draw {cfg.draw}"


def _run_cell(
    spec: GridSpec,
    label: str,
    cfg,
    cfg_hash: str,
    head: str,
    result: GridResult,
    *,
    data: Prepared,
    store: mt.Store,
    progress: bool,
) -> None:
    """Claim one cell and fine-tune it in the claimed run; a failed cell is recorded, not raised."""
    from mococxr.train.finetune import finetune

    cell = mt.tags(grid=spec.name, init=label)  # the grid's own label is what the report groups by
    run_id, holder = runs.claim_run(
        spec.experiment,
        mt.tags(kind="finetune", config_hash=cfg_hash),
        parent_run_id=result.parent_run_id,
        run_name=f"{spec.name}-{label}-{cfg.protocol}-f{cfg.fraction:g}-d{cfg.draw}",
        tags={**cell, **mt.tags(protocol=cfg.protocol, label_fraction=cfg.fraction, draw=cfg.draw)},
    )
    if run_id is None:
        if holder.info.status == "FINISHED":
            result.skipped += 1
            result.run_ids.append(holder.info.run_id)
            print(f"{head}: finished meanwhile (run {holder.info.run_id[:8]}), skipped", flush=True)
        else:
            result.elsewhere += 1
            owner = holder.data.tags.get(mt.tag("owner"), "another process")
            print(f"{head}: running in {owner} (run {holder.info.run_id[:8]}), left to it", flush=True)
        return
    t0 = time.perf_counter()
    try:
        with mt.claimed_run(run_id):
            res = finetune(
                cfg,
                data=data,
                store=store,
                parent_run_id=result.parent_run_id,
                progress=progress,
                extra_tags=cell,
            )
    except KeyboardInterrupt:
        _end(run_id, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except Exception as exc:  # one failed cell must not lose the others; re-running redoes it
        _end(run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        result.failed.append(f"{head}: {exc.__class__.__name__}: {exc}")
        print(f"{head}: FAILED ({exc})", flush=True)
        return
    result.started += 1
    result.run_ids.append(res.run_id)
    auc = res.test.get("test/auc", float("nan"))
    print(
        f"{head}: test AUC {auc:.4f} (best epoch {res.best_epoch}, {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


def _end(run_id: str, status: str, reason: str) -> None:
    """End a claimed run the fine-tune never opened (it failed before its MLflow run started)."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, mt.tag("end_reason"), reason[:500])
        client.set_terminated(run_id, status)


def _close(spec: GridSpec, jobs: list, result: GridResult, status: str) -> None:
    """Summarise the grid on its parent run and end it, unless other processes still run its cells."""
    client = MlflowClient()
    parent = result.parent_run_id
    done = runs.finished_hashes(spec.experiment)
    n_finished = sum(config_hash(c) in done for _, c in jobs)
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
    )
    others = [r for r in children if runs.is_stale(r) is None]
    if status == "FINISHED" and n_finished < len(jobs):
        status = "FAILED"
    counts = {
        "n_cells": len(jobs),
        "n_finished": n_finished,
        "n_started": result.started,
        "n_skipped": result.skipped,
        "n_failed": len(result.failed),
        "n_elsewhere": result.elsewhere,
    }
    client.log_batch(
        parent, metrics=[Metric(f"grid/{k}", v, int(time.time() * 1000), 0) for k, v in counts.items()]
    )
    state = f"{len(others)} cell(s) still running elsewhere" if others else f"ended {status}"
    client.set_tag(parent, NOTE, describe_grid(spec, f"{n_finished} of {len(jobs)} cells finished; {state}."))
    if not others:
        client.set_terminated(parent, status)


def _dry_run(spec: GridSpec, jobs: list) -> GridResult:
    """Print each cell's state (finished, held elsewhere, would run); read the store, write nothing."""
    result = GridResult(parent_run_id="", total=len(jobs))
    for i, (label, cfg) in enumerate(jobs, 1):
        head = _head(i, len(jobs), label, cfg)
        finished, live = runs.cell_runs(
            spec.experiment, mt.tags(kind="finetune", config_hash=config_hash(cfg)), fix_stale=False
        )
        if finished:
            result.skipped += 1
            result.run_ids.append(finished[0].info.run_id)
            print(f"{head}: finished (run {finished[0].info.run_id[:8]}), would skip", flush=True)
        elif live:
            result.elsewhere += 1
            print(
                f"{head}: running in {live[0].data.tags.get(mt.tag('owner'), 'another process')}", flush=True
            )
        else:
            result.would_run += 1
            print(f"{head}: would run", flush=True)
    print(
        f"dry run of grid {spec.name}: {result.would_run} of {len(jobs)} cells would run, {result.skipped} "
        f"finished, {result.elsewhere} running elsewhere; nothing was written to the store",
        flush=True,
    )
    return result


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["GridResult", "GridSpec", "describe_grid", "load_grid", "pin_init", "run_grid"]
