"""``mococxr paper PLAN --plan``: every run a plan would make, what it costs, and what is already done.

Images are counted from the real split sizes (the datasets are read and split exactly as the runs will
split them) and each run's resolved epochs, and split by kind of work:

    pretraining  MoCo steps (about 1.3 plain training steps: one extra key-encoder forward) and the
                 pretraining monitor's probe (frozen forwards over <= 2,000 train + every val image per epoch)
    training     end-to-end training steps; a linear run's frozen forwards over its draw every epoch (with
                 augmentation), once per learning rate the cell's ``linear_lr`` trains (``select``: each of
                 ``linear_lrs``; ``paper``: one)
    validation   forwards over the val split at the validated epochs (``val_every``, and always the last)
    test         one forward pass over the test split
    features     frozen-feature passes cached on disk and reused (``feature_cache``): the val and test
                 features once per (encoder, image set, size), shared by every linear run of that encoder;
                 a draw's training features once per (encoder, draw) for the fast probe, and for head-only
                 training with ``preset: none``; without the cache, the probe's one pass over train + val

A cached pass is counted once per plan, with the first run (in plan order) that needs it: the cache is
on disk, so later runs, in this process or another, read it. Head-only epochs on cached features cost
no image forwards and are priced at zero. Hours divide images by throughput: measured here for the CPU
(:mod:`mococxr.flows.cost_rate`), the plan's stated figure for a GPU (``cost:``, scaled by pixel count
from 224 px; inference three times the training rate). Runs already finished in the store are marked
done and priced apart (:mod:`mococxr.flows.cost_store`); nothing is written anywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mococxr.errors import ConfigError
from mococxr.flows.cost_rate import Rate, measure
from mococxr.flows.plan import PaperPlan, select_stages

KINDS = ("pretraining", "training", "validation", "test", "features")
MOCO_STEP = 1.3  # a MoCo v2 step in plain training steps (measured ~0.75-0.79 throughput ratio)
FORWARD = 1 / 3  # an inference image in training-step images
MONITOR_TRAIN = 2000  # images the pretraining monitor's probe trains on at most (train/linear_eval.py)
FINETUNE_STAGES = ("chexpert", "shenzhen", "table2", "competition")

# what the report floor's power lines read: family -> task -> (labelled test images, positives)
TestSets = dict[str, dict[str, tuple[int, int]]]


@dataclass
class Line:
    """One training run (a study's trial or a grid's cell) and its images by kind of work."""

    stage: str
    group: str  # the study or grid it belongs to
    what: str  # the run within its group
    backbone: str
    image_size: int
    detail: str = ""
    # kind -> [images through a training step (MoCo steps weighted by MOCO_STEP), images through inference]
    work: dict[str, list[float]] = field(default_factory=dict)
    pays: list[str] = field(default_factory=list)  # cached feature passes this run makes for later runs too
    key: tuple = ()  # how the store knows the run: ("trial", study, params) or ("cell", experiment, config)
    done: bool = False

    def add(self, kind: str, train: float = 0.0, infer: float = 0.0) -> None:
        slot = self.work.setdefault(kind, [0.0, 0.0])
        slot[0] += train
        slot[1] += infer

    def images(self, kind: str | None = None) -> float:
        kinds = KINDS if kind is None else (kind,)
        return sum(sum(self.work.get(k, (0.0, 0.0))) for k in kinds)


def check_readable(plan: PaperPlan) -> None:
    """``--plan`` reads the label CSVs to count images: a missing folder is one clear line, not a trace."""
    for key, cfg in plan.data.items():
        if not Path(cfg.root).is_dir():
            hint = (
                "the plan synthesizes it: run without --plan, or --only data, first"
                if plan.phantom
                else f"pass --{key}-root DIR"
            )
            raise ConfigError(f"{key} data folder {cfg.root} does not exist ({hint})")


class Datasets:
    """Every data config a plan's runs use, read once per label file and split as the runs split it."""

    def __init__(self) -> None:
        self._records: dict[tuple, pd.DataFrame] = {}
        self._prepared: dict[Any, Any] = {}
        self._fingerprints: dict[int, tuple[pd.DataFrame, int]] = {}

    def __call__(self, cfg):
        from mococxr.data.prepare import prepare, read

        if cfg not in self._prepared:
            source = (cfg.dataset, cfg.root, cfg.csv, cfg.frontal_only)
            if source not in self._records:
                self._records[source] = read(cfg)
            self._prepared[cfg] = prepare(cfg, records=self._records[source])
        return self._prepared[cfg]

    def images(self, split: pd.DataFrame) -> int:
        """The identity of a split's image set (ordered ids and paths), as the feature cache keys it."""
        if id(split) not in self._fingerprints:  # the split is kept with it, so its id is never reused
            cols = [c for c in ("image_id", "path") if c in split.columns]
            fingerprint = int(pd.util.hash_pandas_object(split[cols], index=False).sum())
            self._fingerprints[id(split)] = (split, fingerprint)
        return self._fingerprints[id(split)][1]


def plan_lines(plan: PaperPlan, only=None, *, data: Datasets | None = None, checkpoints=None) -> list[Line]:
    """One line per training run the plan makes (studies' trials and grid cells), with image counts.

    ``checkpoints(backbone, n)`` gives Table 2's inits, label -> URI (the registered trial checkpoints
    where the store has them); without it, placeholders for the ``n`` trials' checkpoints.
    """
    from mococxr.config import config_hash

    stages = select_stages(only)
    data = data or Datasets()
    lines: list[Line] = []
    seen: set[str] = set()  # a cell two stages share (competition's effusion = chexpert's) runs once
    shared: set[tuple] = set()  # cached feature passes already counted
    if "pretrain" in stages:
        lines += _pretrain_lines(plan, data(plan.data["chexpert"]))
    for stage in (s for s in FINETUNE_STAGES if s in stages):
        for grid in _grids(plan, stage, checkpoints):
            prep = data(grid.base.data)
            for label, cfg in grid.configs():
                if config_hash(cfg) not in seen:
                    seen.add(config_hash(cfg))
                    lines.append(cell_line(stage, grid.name, label, cfg, prep, data, shared))
    return lines


def _grids(plan: PaperPlan, stage: str, checkpoints) -> list:
    if stage == "table2":
        if plan.table2 is None:
            return []
        n = len(trial_points(plan, plan.table2.backbone))
        if checkpoints is not None:
            inits = checkpoints(plan.table2.backbone, n)
        else:
            name = plan.registered_model(plan.table2.backbone)
            inits = {f"trial {i} (not registered)": f"models:/{name}/pending-{i}" for i in range(1, n + 1)}
        return [plan.table2_grid(inits)]
    return plan.grid_specs(stage) if stage in plan.grids else []


def trial_points(plan: PaperPlan, backbone: str) -> list[tuple]:
    """The trials the backbone's study runs: its grid points (as many as the budget allows) or n_trials."""
    from mococxr.sweep.storage import study_budget

    spec = plan.study_spec(backbone)
    choices = [p.choices for p in spec.search_space.values()]
    points = list(itertools.product(*choices)) if all(choices) else [() for _ in range(spec.budget.n_trials)]
    return points[: study_budget(spec)]


def _pretrain_lines(plan: PaperPlan, prep) -> list[Line]:
    out = []
    n_train, n_val, n_pretrain = len(prep.splits["train"]), len(prep.splits["val"]), len(prep.pretrain)
    for backbone in plan.backbones:
        spec = plan.study_spec(backbone)
        names = list(spec.search_space)
        for i, point in enumerate(trial_points(plan, backbone)):
            what = (
                " ".join(
                    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in zip(names, point, strict=True)
                )
                if point
                else f"trial {i} (sampled)"
            )
            line = Line(
                "pretrain",
                spec.name,
                what,
                backbone,
                spec.base.image_size,
                detail=f"{n_pretrain:,} img x {spec.epochs} ep",
                key=("trial", spec.name, dict(zip(names, point, strict=True)) if point else i),
            )
            line.add(
                "pretraining",
                train=spec.epochs * n_pretrain * MOCO_STEP,
                infer=spec.epochs * (min(MONITOR_TRAIN, n_train) + n_val),
            )
            out.append(line)
    return out


def resolved_epochs(cfg, n_train: int) -> int:
    """The epochs a fine-tune run of ``n_train`` images will train: the fine-tune module's own budget rule
    (by label fraction, or by the ``n_train`` labelled images under ``epochs_rule: size``)."""
    from mococxr.train.budget import training_budget

    # the loader drops a last short batch
    steps = n_train // cfg.batch_size if n_train > cfg.batch_size else 1
    return training_budget(cfg, steps, n_train).epochs


def lr_candidates(cfg) -> int:
    """Learning rates a cell's head trains at: each of ``linear_lrs`` under ``linear_lr: select``, else one
    (end-to-end runs train at ``lr`` alone)."""
    return len(cfg.linear_lrs) if cfg.protocol == "linear" and cfg.linear_lr == "select" else 1


def validation_passes(epochs: int, every: int) -> int:
    """Validated epochs of a run: every ``every``-th and always the last (the fine-tune module's rule)."""
    from mococxr.train.budget import validation_epochs

    return len(validation_epochs(epochs, every))


def draw_size(cfg, prep) -> int:
    n = len(prep.splits["train"])
    return n if cfg.fraction == 1 else max(1, round(cfg.fraction * n))


def cell_line(stage: str, grid: str, label: str, cfg, prep, data: Datasets, shared: set[tuple]) -> Line:
    """A fine-tune cell's images by kind; cached feature passes not yet in ``shared`` are this cell's."""
    from mococxr.data.splits import percent

    n_train, n_val, n_test = draw_size(cfg, prep), len(prep.splits["val"]), len(prep.splits["test"])
    epochs = resolved_epochs(cfg, n_train)
    line = Line(
        stage,
        grid,
        f"{label} {cfg.protocol} {percent(cfg.fraction)} draw {cfg.draw}",
        cfg.backbone,
        cfg.image_size,
        detail=f"{n_train:,} img x {epochs} ep",
        key=("cell", cfg.experiment, cfg),
    )
    val_passes = validation_passes(epochs, cfg.val_every)
    if cfg.protocol == "e2e":
        line.add("training", train=n_train * epochs)
        line.add("validation", infer=n_val * val_passes)
        line.add("test", infer=n_test)
        if val_passes != epochs:
            line.detail += f", val x{val_passes}"
        return line
    lrs = lr_candidates(cfg)
    if lrs > 1:
        line.detail += f" x {lrs} lr"
    if not cfg.feature_cache:  # every image is a forward pass, every epoch (plus the probe's one pass)
        line.add("training", infer=n_train * epochs * lrs)
        line.add("validation", infer=n_val * val_passes * lrs)
        line.add("test", infer=n_test)
        line.add("features", infer=n_train + n_val)
        return line
    encoder = (cfg.backbone, cfg.init, cfg.image_size) + (
        (cfg.seed, cfg.draw) if cfg.init == "random" else ()
    )
    draw = (*encoder, "train", cfg.data, cfg.fraction, cfg.draw, cfg.seed)

    def need(key: tuple, n: int, what: str) -> None:
        if key not in shared:
            shared.add(key)
            line.add("features", infer=n)
            line.pays.append(what)

    need((*encoder, "images", data.images(prep.splits["val"])), n_val, "val")
    need((*encoder, "images", data.images(prep.splits["test"])), n_test, "test")
    need(draw, n_train, "train")  # the probe's (eval transform), and preset none's head-only training
    if cfg.preset != "none":  # augmented: every epoch is a pass of the frozen encoder over the draw
        line.add("training", infer=n_train * epochs * lrs)
    return line


def power_inputs(plan: PaperPlan, only, data: Datasets) -> TestSets:
    """family -> task -> (labelled test images, positives) for every table family the stages make."""
    stages = select_stages(only)
    out: TestSets = {}
    for stage in (s for s in FINETUNE_STAGES if s in stages):
        if stage == "table2" and plan.table2 is not None:
            cfgs = [plan.data["shenzhen"]]
        elif stage in plan.grids:
            cfgs = list(dict.fromkeys(g.base.data for g in plan.grid_specs(stage)))
        else:
            continue
        for cfg in cfgs:
            prep = data(cfg)
            task = prep.tasks[0]
            y = prep.splits["test"][task].dropna()
            out.setdefault(stage, {})[task] = (int(len(y)), int((y == 1).sum()))
    return out


def estimate(
    plan: PaperPlan,
    only=None,
    *,
    power: bool = True,
    tracking_uri: str | None = None,
    measure: Callable | None = None,
) -> str:
    """Count, look up what is done, measure and format: what ``--plan`` prints. With ``power``, the
    report floor's :func:`mococxr.report.power.power_lines` adds what the plan's test sets can resolve."""
    from mococxr.flows import cost_rate
    from mococxr.flows.cost_format import format_plan
    from mococxr.flows.cost_store import StoreView
    from mococxr.report.power import power_lines

    check_readable(plan)
    data = Datasets()
    view = StoreView.open(plan, tracking_uri)
    lines = plan_lines(plan, only, data=data, checkpoints=view.table2_inits)
    view.mark(lines)
    measure = measure or cost_rate.measure
    rates = {key: measure(*key) for key in sorted({(ln.backbone, ln.image_size) for ln in lines})}
    text = format_plan(plan, lines, rates, store=view.describe())
    if power:
        text += "\n\n" + "\n".join(power_lines(plan, power_inputs(plan, only, data)))
    return text


__all__ = [
    "FORWARD",
    "KINDS",
    "MOCO_STEP",
    "Datasets",
    "Line",
    "Rate",
    "TestSets",
    "cell_line",
    "check_readable",
    "estimate",
    "lr_candidates",
    "measure",
    "plan_lines",
    "power_inputs",
    "resolved_epochs",
    "trial_points",
    "validation_passes",
]
