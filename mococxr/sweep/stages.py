"""Running a plan's stages (see :mod:`mococxr.sweep.plan` for what each stage is).

Each stage calls the code that already runs it alone: ``run_study`` for pretraining, the registry for
checkpoints, ``run_grid`` for fine-tuning. Reports sit a floor above and come in as a callback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mococxr.config import DataConfig
from mococxr.errors import ConfigError
from mococxr.sweep.grid import GridResult, run_grid
from mococxr.sweep.plan import PaperPlan, ReportHook, select_stages
from mococxr.tracking import mlflow as mt


@dataclass
class Checkpoint:
    """One registered trial checkpoint of a plan's study (a Table 2 row's source)."""

    backbone: str
    registered_model: str
    version: str
    trial: int
    lr: float
    scheduler: str
    pretrain_run_id: str
    epoch: int
    value: float


@dataclass
class PlanResult:
    stages: list[str]
    grids: dict[str, GridResult] = field(default_factory=dict)  # grid name -> result
    checkpoints: dict[str, list[Checkpoint]] = field(default_factory=dict)  # backbone -> trial checkpoints
    production: dict[str, str] = field(default_factory=dict)  # backbone -> models:/NAME/version
    reports: dict[str, str] = field(default_factory=dict)  # family -> report run id
    started: int = 0  # training runs started by this call (studies' trials + grid cells)
    seconds: float = 0.0


def _say(line: str) -> None:
    print(line, flush=True)


def run_plan(
    plan: PaperPlan,
    *,
    only: Sequence[str] | None = None,
    report: ReportHook | None = None,
    store: mt.Store | None = None,
) -> PlanResult:
    """Run the plan's stages in order (all, or ``only``); returns what each made or found."""
    store = mt.current_store(store)
    stages = select_stages(only)
    result = PlanResult(stages=stages)
    t0 = time.perf_counter()
    _check_weights(plan)
    prepared: dict[str, Any] = {}
    for n, stage in enumerate(stages, 1):
        _say(f"\n=== plan {plan.name}: stage {n}/{len(stages)} {stage} ===")
        if stage == "data":
            _stage_data(plan)
        elif stage == "pretrain":
            _stage_pretrain(plan, result, store, prepared)
        elif stage in plan.grids:
            for grid in plan.grid_specs(stage):
                _run_one_grid(grid, result, store, prepared)
        elif stage == "table2" and plan.table2 is not None:
            _stage_table2(plan, result, store, prepared)
        elif stage == "report":
            if report is None:
                raise ConfigError("the report stage needs the report module (mococxr paper does that)")
            _collect_checkpoints(plan, result)
            result.reports = report(plan, {"checkpoints": result.checkpoints, "store": store})
        else:
            _say(f"stage {stage}: not in {plan.source}, skipped")
    result.seconds = time.perf_counter() - t0
    _say(
        f"\nplan {plan.name}: {', '.join(stages)} done in {result.seconds:.0f} s; {result.started} training "
        "run(s) started by this call"
    )
    return result


def _check_weights(plan: PaperPlan) -> None:
    """The paper starts every MoCo model (and the baseline) from ImageNet: a missing file stops the plan
    before anything runs, naming the file and where it goes."""
    from mococxr.models.backbones import require_imagenet_weights

    for backbone in plan.imagenet_needed():
        require_imagenet_weights(backbone)


def prepare_phantom(plan: PaperPlan) -> None:
    """Synthesize both phantom layouts once; a layout whose folder already holds it is reused.

    Both roots are checked before either is written: a root that holds anything but a phantom (a real
    dataset named by ``--chexpert-root``) stops the plan with nothing written."""
    from mococxr.data.phantom import check_target, is_phantom_of, synthesize

    ph = plan.phantom
    layouts = [("chexpert", ph.chexpert_n, ph.chexpert_valid), ("shenzhen", ph.shenzhen_n, None)]
    for key, _, _ in layouts:
        check_target(plan.data[key].root)
    for key, n, n_valid in layouts:
        root = Path(plan.data[key].root)
        params = {"size": ph.size, "seed": ph.seed, "layout": key, "n_valid": n_valid}
        if is_phantom_of(root, n, **params):
            _say(f"phantom {key} data already at {root}, reused")
            continue
        t0 = time.perf_counter()
        synthesize(root, n, **params)
        _say(f"phantom {key} data: {n} images at {root} in {time.perf_counter() - t0:.0f} s")


def _stage_data(plan: PaperPlan) -> None:
    from mococxr.data.records import check_dataset

    if plan.phantom is not None:
        prepare_phantom(plan)
    for key, cfg in plan.data.items():
        problems = check_dataset(cfg.dataset, cfg.root, cfg.csv)
        if problems:
            raise ConfigError(
                f"{key} data under {cfg.root}: {len(problems)} problem(s), first: {problems[0]}"
            )


def _prepared(cfg: DataConfig, cache: dict):
    from mococxr.data.prepare import prepare

    if cfg not in cache:  # one read and split per dataset config for the whole plan
        cache[cfg] = prepare(cfg)
    return cache[cfg]


def _stage_pretrain(plan: PaperPlan, result: PlanResult, store: mt.Store, prepared: dict) -> None:
    from mococxr.sweep.storage import study_budget
    from mococxr.sweep.study import run_study

    for backbone in plan.backbones:
        spec = plan.study_spec(backbone, storage=store.optuna_storage)
        _say(
            f"-- pretraining study {spec.name}: {study_budget(spec)} trial(s) of {spec.epochs} epochs, "
            f"pruner {spec.pruner.name}"
        )
        res = run_study(spec, store=store, data=_prepared(spec.base.data, prepared))
        result.started += len(res.trials_run)
        checkpoints = register_trials(plan, backbone, spec)
        result.checkpoints[backbone] = checkpoints
        result.production[backbone] = _promote_best(plan, backbone, checkpoints, spec.direction)


def register_trials(plan: PaperPlan, backbone: str, spec) -> list[Checkpoint]:
    """Register each COMPLETE trial's selected checkpoint once (found by its tags when registered before)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from mococxr.tracking.registry import register

    name = plan.registered_model(backbone)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    known = {
        (
            mv.tags.get(mt.tag("optuna_study")),
            mv.tags.get(mt.tag("optuna_trial")),
            mv.tags.get(mt.TAG_PREFIX + "model_id"),
        ): str(mv.version)
        for mv in MlflowClient().search_model_versions(f"name = {mt.quote_filter(name)}")
    }  # [] for a new name
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        model_id, epoch = t.user_attrs.get("best_model_id"), t.user_attrs.get("best_epoch")
        if not model_id or epoch is None:
            continue
        lr, scheduler = (
            float(t.params.get("lr", spec.base.lr)),
            str(t.params.get("scheduler", spec.base.scheduler)),
        )
        version = known.get((spec.name, str(t.number), model_id))
        if version is None:
            version = register(
                name,
                model_id=model_id,
                extra_tags=mt.tags(
                    backbone=backbone,
                    optuna_study=spec.name,
                    optuna_trial=t.number,
                    lr=lr,
                    scheduler=scheduler,
                ),
            )
            _say(f"registered trial {t.number} epoch {epoch} as {name} version {version}")
        out.append(
            Checkpoint(
                backbone,
                name,
                version,
                t.number,
                lr,
                scheduler,
                str(t.user_attrs.get("mlflow_run_id", "")),
                int(epoch),
                float(t.value),
            )
        )
    return out


def _promote_best(plan: PaperPlan, backbone: str, checkpoints: list[Checkpoint], direction: str) -> str:
    from mococxr.tracking.registry import alias_version, promote

    if not checkpoints:
        raise ConfigError(
            f"study {plan.study_name(backbone)} has no complete trial to promote; see its trials"
        )
    best = (max if direction == "maximize" else min)(checkpoints, key=lambda c: c.value)
    name = plan.registered_model(backbone)
    if alias_version(name, "production") != best.version:
        promote(name, best.version, "production")
        _say(
            f"{name} version {best.version} (trial {best.trial}, lr {best.lr:g}, {best.scheduler}) -> production"
        )
    return f"models:/{name}/{best.version}"


def _collect_checkpoints(plan: PaperPlan, result: PlanResult) -> None:
    """The registered trial checkpoints, read from the studies when the pretrain stage did not run now."""
    import optuna

    for backbone in plan.backbones:
        if backbone in result.checkpoints:
            continue
        spec = plan.study_spec(backbone, storage=mt.current_store().optuna_storage)
        try:
            result.checkpoints[backbone] = register_trials(plan, backbone, spec)
        except KeyError:  # optuna: no such study yet
            result.checkpoints[backbone] = []
        except optuna.exceptions.StorageInternalError:
            result.checkpoints[backbone] = []


def _run_one_grid(grid, result: PlanResult, store: mt.Store, prepared: dict) -> None:
    _say(f"-- grid {grid.name} ({len(grid.configs())} cells) -> experiment {grid.experiment}")
    res = run_grid(grid, store=store, data=_prepared(grid.base.data, prepared))
    result.grids[grid.name] = res
    result.started += res.started
    if res.failed:
        raise ConfigError(f"grid {grid.name}: {len(res.failed)} cell(s) failed; first: {res.failed[0]}")


def _stage_table2(plan: PaperPlan, result: PlanResult, store: mt.Store, prepared: dict) -> None:
    _collect_checkpoints(plan, result)
    checkpoints = result.checkpoints.get(plan.table2.backbone) or []
    if not checkpoints:
        raise ConfigError(
            f"table2: no registered {plan.table2.backbone} trial checkpoints; run the pretrain stage"
        )
    inits = {table2_label(c): f"models:/{c.registered_model}/{c.version}" for c in checkpoints}
    _run_one_grid(plan.table2_grid(inits), result, store, prepared)


def table2_label(c: Checkpoint) -> str:
    """The Table 2 grid's init label of a checkpoint: ``lr0.001-cosine-t3``."""
    return trial_label(c.lr, c.scheduler, c.trial)


def trial_label(lr: float, scheduler: str, trial: int | str) -> str:
    """The Table 2 label of a pretraining trial's checkpoint, from its lr, scheduler and trial number."""
    return f"lr{lr:g}-{scheduler}-t{trial}"


__all__ = [
    "Checkpoint",
    "PlanResult",
    "prepare_phantom",
    "register_trials",
    "run_plan",
    "table2_label",
    "trial_label",
]
