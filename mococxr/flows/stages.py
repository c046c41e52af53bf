"""A plan's stages, one function each (see :mod:`mococxr.flows.plan` for what each stage is).

Each stage calls the code that already runs it alone: ``run_study`` for pretraining, the registry for
checkpoints, ``run_grid`` for fine-tuning. :func:`mococxr.flows.paper.run_plan` runs them in order and
ends with the report stage (report/ called as plain functions).

Every ``mococxr paper`` process is a worker: several started on one store share each stage's work
through Optuna's storage (:mod:`mococxr.sweep.queue`). A study's trials and a grid's cells are queue
items; a step that must happen once (registering and promoting a study's checkpoints, building a
report) is a one-item queue (:func:`~mococxr.sweep.queue.run_once`) whose result every worker reads.
A stage ends for a worker only when its work is done in every worker: the barrier before the next
stage, which each worker announces with what it waits for.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mococxr.config import DataConfig
from mococxr.errors import ConfigError
from mococxr.flows.plan import PaperPlan
from mococxr.sweep.grid import GridResult, run_grid
from mococxr.sweep.queue import run_once
from mococxr.tracking import filters as flt
from mococxr.tracking import mlflow as mt
from mococxr.tracking.registry import alias_version, promote, register


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


def say(line: str) -> None:
    print(line, flush=True)


def check_weights(plan: PaperPlan) -> None:
    """The paper starts every MoCo model (and the baseline) from ImageNet: a missing file stops the plan
    before anything runs, naming the file and where it goes."""
    from mococxr.models.backbones import require_imagenet_weights

    for backbone in plan.imagenet_needed():
        require_imagenet_weights(backbone)


def check_phantom_roots(plan: PaperPlan) -> None:
    """A phantom plan writes its data only into folders the phantom owns (new, empty, or its own): a root
    that holds anything else (a real dataset named by ``--chexpert-root``) is refused, naming it. Called
    before a store opens, and again before anything is written."""
    from mococxr.data.phantom import check_target

    if plan.phantom is not None:
        for key in ("chexpert", "shenzhen"):
            check_target(plan.data[key].root)


def prepare_phantom(plan: PaperPlan) -> None:
    """Synthesize both phantom layouts once; a layout whose folder already holds it is reused.

    Both roots are checked before either is written: a root that holds anything but a phantom (a real
    dataset named by ``--chexpert-root``) stops the plan with nothing written."""
    ph = plan.phantom
    check_phantom_roots(plan)
    layouts = [("chexpert", ph.chexpert_n, ph.chexpert_valid), ("shenzhen", ph.shenzhen_n, None)]
    for key, n, n_valid in layouts:
        make_phantom(plan.data[key].root, n, size=ph.size, seed=ph.seed, layout=key, n_valid=n_valid)


def make_phantom(root: str | Path, n: int, **params) -> Path:
    """Synthesize the phantom of ``n`` images with ``params`` (``size``, ``seed``, ``layout``, ``n_valid``:
    see :func:`mococxr.data.phantom.synthesize`) at ``root`` once, under :class:`folder_lock`: workers on
    one machine (or one shared disk) make it once; a folder that already holds it is reused. Returns
    ``root``."""
    from mococxr.data.phantom import is_phantom_of, synthesize

    root, layout = Path(root), params.get("layout", "chexpert")
    with folder_lock(root):
        if is_phantom_of(root, n, **params):
            say(f"phantom {layout} data already at {root}, reused")
            return root
        t0 = time.perf_counter()
        synthesize(root, n, **params)
    say(f"phantom {layout} data: {n} images at {root} in {time.perf_counter() - t0:.0f} s")
    return root


class folder_lock:  # noqa: N801 - used as a context manager, like open()
    """An exclusive ``flock`` on ``.<folder>.lock`` beside ``folder``: one writer per data folder among the
    workers that see this disk, whoever came first; the others wait, then find the data made."""

    def __init__(self, folder: Path) -> None:
        self.path = folder.parent / f".{folder.name}.lock"

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def stage_data(plan: PaperPlan) -> None:
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


def stage_pretrain(plan: PaperPlan, result: PlanResult, store: mt.Store, prepared: dict) -> None:
    from mococxr.sweep.storage import study_budget
    from mococxr.sweep.study import run_study

    for backbone in plan.backbones:
        spec = plan.study_spec(backbone, storage=store.optuna_storage)
        say(
            f"-- pretraining study {spec.name}: {study_budget(spec)} trial(s) of {spec.epochs} epochs, "
            f"pruner {spec.pruner.name}"
        )
        res = run_study(spec, store=store, data=_prepared(spec.base.data, prepared))
        result.started += len(res.trials_run)

        def register_and_promote(spec=spec, backbone=backbone) -> dict[str, str]:
            checkpoints = register_trials(plan, backbone, spec)
            return {"production": _promote_best(plan, backbone, checkpoints, spec.direction)}

        step = f"{spec.name}.promote.{digest(_complete_trials(spec))}"
        done = run_once(step, spec.storage, register_and_promote, heartbeat=spec.heartbeat, say=say)
        result.checkpoints[backbone] = register_trials(plan, backbone, spec)  # registered: found, not made
        result.production[backbone] = done["production"]


def digest(parts: Iterable[object]) -> str:
    """A short hash naming a once-step by its inputs: new inputs (more trials, new runs) make a new step."""
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:12]


def _complete_trials(spec) -> list[tuple[int, str]]:
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    states = (optuna.trial.TrialState.COMPLETE,)
    return sorted((t.number, t.user_attrs.get("best_model_id", "")) for t in study.get_trials(states=states))


def register_trials(plan: PaperPlan, backbone: str, spec) -> list[Checkpoint]:
    """Register each COMPLETE trial's selected checkpoint once (found by its tags when registered before)."""
    import optuna
    from mlflow.tracking import MlflowClient

    name = plan.registered_model(backbone)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    known = {
        (
            mv.tags.get(mt.tag("optuna_study")),
            mv.tags.get(mt.tag("optuna_trial")),
            mv.tags.get(mt.tag("model_id")),
        ): str(mv.version)
        for mv in MlflowClient().search_model_versions(flt.equal("name", name))
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
            say(f"registered trial {t.number} epoch {epoch} as {name} version {version}")
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
    """Alias the study's best registered trial checkpoint ``production`` (left alone when it holds it)."""
    if not checkpoints:
        raise ConfigError(
            f"study {plan.study_name(backbone)} has no complete trial to promote; see its trials"
        )
    best = (max if direction == "maximize" else min)(checkpoints, key=lambda c: c.value)
    name = plan.registered_model(backbone)
    if alias_version(name, "production") != best.version:
        promote(name, best.version, "production")
        trial = f"trial {best.trial}, lr {best.lr:g}, {best.scheduler}"
        say(f"{name} version {best.version} ({trial}) -> production")
    return f"models:/{name}/{best.version}"


def collect_checkpoints(plan: PaperPlan, result: PlanResult, store: mt.Store) -> None:
    """The registered trial checkpoints, read from the studies when the pretrain stage did not run now."""
    import optuna

    for backbone in plan.backbones:
        if backbone in result.checkpoints:
            continue
        spec = plan.study_spec(backbone, storage=store.optuna_storage)
        try:
            result.checkpoints[backbone] = register_trials(plan, backbone, spec)
        except KeyError:  # optuna: no such study yet
            result.checkpoints[backbone] = []
        except optuna.exceptions.StorageInternalError:
            result.checkpoints[backbone] = []


def run_one_grid(plan: PaperPlan, grid, result: PlanResult, store: mt.Store, prepared: dict) -> None:
    """Work on one grid with the other workers; returns when none of its cells is left in any of them."""
    grid = replace(grid, storage=store.optuna_storage, heartbeat=plan.heartbeat)
    say(f"-- grid {grid.name} ({len(grid.configs())} cells) -> experiment {grid.experiment}")
    res = run_grid(grid, store=store, data=_prepared(grid.base.data, prepared))
    result.grids[grid.name] = res
    result.started += res.started
    if res.failed:
        raise ConfigError(f"grid {grid.name}: {len(res.failed)} cell(s) failed; first: {res.failed[0]}")


def stage_table2(plan: PaperPlan, result: PlanResult, store: mt.Store, prepared: dict) -> None:
    collect_checkpoints(plan, result, store)
    checkpoints = result.checkpoints.get(plan.table2.backbone) or []
    if not checkpoints:
        raise ConfigError(
            f"table2: no registered {plan.table2.backbone} trial checkpoints; run the pretrain stage"
        )
    inits = {table2_label(c): f"models:/{c.registered_model}/{c.version}" for c in checkpoints}
    run_one_grid(plan, plan.table2_grid(inits), result, store, prepared)


def table2_label(c: Checkpoint) -> str:
    """The Table 2 grid's init label of a checkpoint: ``lr0.001-cosine-t3``."""
    return trial_label(c.lr, c.scheduler, c.trial)


def trial_label(lr: float, scheduler: str, trial: int | str) -> str:
    """The Table 2 label of a pretraining trial's checkpoint, from its lr, scheduler and trial number."""
    return f"lr{lr:g}-{scheduler}-t{trial}"


__all__ = [
    "Checkpoint",
    "PlanResult",
    "check_weights",
    "collect_checkpoints",
    "digest",
    "folder_lock",
    "make_phantom",
    "check_phantom_roots",
    "prepare_phantom",
    "register_trials",
    "run_one_grid",
    "say",
    "stage_data",
    "stage_pretrain",
    "stage_table2",
    "table2_label",
    "trial_label",
]
