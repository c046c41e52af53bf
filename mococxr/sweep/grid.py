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

All runs hang under one parent run. Re-running is idempotent: a run whose config hash matches a
FINISHED run of the experiment is skipped, failed ones are redone. Registry references such as
``models:/NAME@production`` are pinned to a version before hashing, so promoting a new checkpoint
makes new runs instead of silently reusing old ones. The data is read and split once for the whole
grid, so every cell is scored on one test set.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

from mococxr.config import config_hash
from mococxr.data.prepare import Prepared, prepare
from mococxr.errors import ConfigError
from mococxr.sweep.spec import GridSpec, load_grid
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
    parent_run_id: str
    run_ids: list[str] = field(default_factory=list)
    started: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def parent_run(spec: GridSpec, spec_hash: str) -> str:
    """Find or create the grid's parent run (one per grid name and spec); it only groups the cells."""
    base = spec.base

    def describe(run_id: str) -> None:
        mt.log_json({"inits": spec.inits, "protocols": spec.protocols, "fractions": spec.fractions,
                     "draws": spec.draws}, "grid.json", run_id=run_id)

    return runs.parent_run(
        spec.experiment, key=mt.tags(kind="grid", config_hash=spec_hash), run_name=f"grid-{spec.name}",
        tags=mt.tags(dataset=base.data.dataset, task=base.data.task, backbone=base.backbone),
        describe=describe, running=False,
    )


def run_grid(spec: GridSpec, *, dry_run: bool = False, progress: bool = True,
             store: mt.Store | None = None, data: Prepared | None = None) -> GridResult:
    """Run every missing cell of the grid; returns what ran, what was skipped and what failed.

    ``store`` is the MLflow store (the one in force when not given); ``data`` the base data already
    prepared by the caller (else prepared at the first cell that runs).
    """
    if data is not None and data.config != spec.base.data:
        raise ConfigError(f"grid {spec.name}: the prepared data is for {data.config}, the grid's base is "
                          f"{spec.base.data}")
    from mococxr.train.finetune import finetune

    store = mt.current_store(store)
    spec = replace(spec, inits={label: pin_init(init) for label, init in spec.inits.items()})
    jobs = spec.configs()
    parent = parent_run(spec, _sha(spec.name + ":" + ",".join(config_hash(c) for _, c in jobs)))
    done = runs.finished_hashes(spec.experiment)
    result = GridResult(parent_run_id=parent)
    data = None
    for i, (label, cfg) in enumerate(jobs, 1):
        h = config_hash(cfg)
        head = f"[{i}/{len(jobs)}] {label:>8} {cfg.protocol:>6} fraction {cfg.fraction:g} draw {cfg.draw}"
        if h in done:
            result.skipped += 1
            result.run_ids.append(done[h])
            print(f"{head}: finished before (run {done[h][:8]}), skipped", flush=True)
            continue
        if dry_run:
            print(f"{head}: would run", flush=True)
            continue
        if data is None:
            data = prepare(spec.base.data)  # one split for the whole grid: one test set
        t0 = time.perf_counter()
        try:
            # the grid's own label (random, imagenet, moco, ...) is what the report groups by
            res = finetune(cfg, data=data, store=store, parent_run_id=parent, progress=progress,
                           extra_tags=mt.tags(grid=spec.name, init=label))
        except Exception as exc:  # one failed cell must not lose the others; re-running redoes it
            result.failed.append(f"{head}: {exc.__class__.__name__}: {exc}")
            print(f"{head}: FAILED ({exc})", flush=True)
            continue
        result.started += 1
        result.run_ids.append(res.run_id)
        auc = res.test.get("test/auc", float("nan"))
        print(f"{head}: test AUC {auc:.4f} (best epoch {res.best_epoch}, {time.perf_counter() - t0:.0f} s)",
              flush=True)
    return result


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["GridResult", "GridSpec", "load_grid", "pin_init", "run_grid"]
