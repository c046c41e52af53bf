"""Multi-stage plans: studies -> registration -> fine-tune grids -> reports, e.g. the whole paper.

A plan (``sweeps/paper.yaml``, ``sweeps/paper_phantom.yaml``) names the datasets once and describes
each stage; this module turns it into the study specs and grid specs that :mod:`mococxr.sweep.study`
and :mod:`mococxr.sweep.grid` already run, in order::

    data         check the datasets (the phantom plan synthesizes both layouts first)
    pretrain     one Optuna study per backbone over learning rate x scheduler, run to completion;
                 every trial's selected checkpoint is registered (tagged backbone, lr, scheduler,
                 trial, epoch) and the best one per backbone is aliased ``production``
    chexpert     baseline vs MoCo, linear and e2e, label fractions x draws, per backbone
    shenzhen     the same on the transfer dataset
    table2       every ResNet18 trial's checkpoint fine-tuned (linear, 100 %) on Shenzhen
    competition  ResNet18 on each competition task, with the task's own uncertainty policy
    report       the paper's tables and figures (report/ called as plain functions: flows/paper.py)

Every stage is idempotent (a study resumes with its remaining budget, a grid skips finished cells,
a registered checkpoint is found rather than registered twice, a report run is updated in place), so
running the plan again starts no training run, and ``--only`` runs a subset. The pleural-effusion
competition cells are the CheXpert stage's ResNet18 cells (same config, same experiment): they run once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mococxr.config import (
    BACKBONES,
    DataConfig,
    FinetuneConfig,
    Policy,
    Validated,
    build,
    coerce,
    load_yaml,
    opt,
    override,
    to_dict,
)
from mococxr.errors import ConfigError
from mococxr.sweep.grid_spec import GridSpec
from mococxr.sweep.spec import (
    Heartbeat,
    StudySpec,
    _check_keys,
    _fractions,
    _mapping,
    _per_fraction,
    parse_spec,
)

STAGE_NAMES = ("data", "pretrain", "chexpert", "shenzhen", "table2", "competition", "report")
GRID_STAGES = ("chexpert", "shenzhen", "competition")
DATASETS = ("chexpert", "shenzhen")
_PLAN_KEYS = frozenset({"name", "data", "phantom", "pretrain", "finetune", "stages", "report", "cost"})
_STUDY_KEYS = frozenset({"objective", "budget", "search_space", "sampler", "pruner", "heartbeat", "base"})


@dataclass(frozen=True)
class Phantom(Validated):
    """The phantom plan's data: both layouts synthesized at the plan's data roots on first use."""

    chexpert_n: int = opt(400, "CheXpert-layout train.csv rows", check="positive")
    chexpert_valid: int = opt(120, "CheXpert-layout valid.csv rows (the test set)", check="positive")
    shenzhen_n: int = opt(240, "Shenzhen-layout images", check="positive")
    size: int = opt(64, "stored image side in pixels", check="positive")
    seed: int = opt(0, "phantom seed")


@dataclass(frozen=True)
class Cost(Validated):
    """What ``--plan`` assumes of a GPU (stated figures); the CPU figures are measured when it runs."""

    gpu: str = opt("one NVIDIA GTX 1070-class GPU", "the GPU the gpu_img_s figures describe")
    gpu_img_s_resnet18: float = opt(
        400.0, "training img/s of ResNet18 at 224 px on that GPU", check="positive"
    )
    gpu_img_s_densenet121: float = opt(130.0, "training img/s of DenseNet121 at 224 px", check="positive")


@dataclass(frozen=True)
class GridStage:
    """A fine-tune stage: which backbones, fractions, draws (and, for competition, tasks -> policy)."""

    name: str
    dataset: str  # chexpert | shenzhen
    backbones: tuple[str, ...]
    fractions: list[float]
    draws: dict[float, int]
    epochs: dict[float, int] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)  # competition: task -> uncertainty policy


@dataclass(frozen=True)
class Table2Stage:
    backbone: str = "resnet18"
    fraction: float = 1.0
    protocol: str = "linear"
    epochs: int | None = None  # absent: the fine-tune base's rule


@dataclass(frozen=True)
class PaperPlan:
    """A validated plan: everything the stages need, nothing run yet."""

    name: str
    source: str
    data: dict[str, DataConfig]
    phantom: Phantom | None
    backbones: tuple[str, ...]
    study: dict[str, Any]  # a study mapping without name, experiment and data (see sweep/spec.py)
    finetune: FinetuneConfig  # the fine-tune base (data and backbone filled in per grid)
    protocol_overrides: dict[str, dict[str, Any]]
    baseline: str  # imagenet | random: the init the MoCo checkpoints are compared with
    grids: dict[str, GridStage]
    table2: Table2Stage | None
    replicates: int = 500
    cost: Cost = field(default_factory=Cost)

    def experiment(self, stage: str) -> str:
        """The MLflow experiment of a stage; competition shares CheXpert's (its effusion cells are
        CheXpert's)."""
        return f"{self.name}-{'chexpert' if stage == 'competition' else stage}"

    def registered_model(self, backbone: str) -> str:
        return f"{self.name}-{backbone}"

    def study_name(self, backbone: str) -> str:
        return f"{self.name}-{backbone}"

    @property
    def moco_start(self) -> str:
        return str(self.study.get("base", {}).get("init", "auto"))

    def study_spec(self, backbone: str, storage: str | None = None) -> StudySpec:
        raw = {
            **self.study,
            "name": self.study_name(backbone),
            "experiment": self.experiment("pretrain"),
            "registered_model": self.registered_model(backbone),
        }
        raw["base"] = {
            **self.study.get("base", {}),
            "data": to_dict(self.data["chexpert"]),
            "backbone": backbone,
        }
        if storage:
            raw["storage"] = storage
        return parse_spec(raw, source=f"{self.source}: pretrain ({backbone})")

    def grid_specs(self, stage: str) -> list[GridSpec]:
        """The grids of a fine-tune stage: one per backbone (chexpert, shenzhen) or per task (competition)."""
        st = self.grids[stage]
        out = []
        for backbone in st.backbones:
            for task, policy in st.tasks.items() if st.tasks else [(None, None)]:
                data = self.data[st.dataset]
                if task is not None:
                    data = replace(data, task=task, policy=policy)
                label = _slug(task) if task else backbone
                out.append(
                    self._grid(
                        f"{self.name}-{stage}-{label}",
                        stage,
                        data,
                        backbone,
                        {
                            self.baseline: self.baseline,
                            "moco": f"models:/{self.registered_model(backbone)}@production",
                        },
                        st.fractions,
                        st.draws,
                        st.epochs,
                    )
                )
        return out

    def table2_grid(self, inits: Mapping[str, str]) -> GridSpec:
        """The Table 2 grid: each registered ResNet18 trial checkpoint, one label per checkpoint."""
        t2 = self.table2
        grid = self._grid(
            f"{self.name}-table2",
            "table2",
            self.data["shenzhen"],
            t2.backbone,
            dict(inits),
            [t2.fraction],
            {t2.fraction: 1},
            {t2.fraction: t2.epochs} if t2.epochs else {},
        )
        return replace(grid, protocols=[t2.protocol])

    def _grid(
        self,
        name: str,
        stage: str,
        data: DataConfig,
        backbone: str,
        inits: dict[str, str],
        fractions: list[float],
        draws: dict[float, int],
        epochs: dict[float, int],
    ) -> GridSpec:
        base = replace(self.finetune, data=data, backbone=backbone)
        return GridSpec(
            name=name,
            experiment=self.experiment(stage),
            base=base,
            inits=inits,
            protocols=["linear", "e2e"],
            fractions=list(fractions),
            draws=dict(draws),
            epochs=dict(epochs),
            protocol_overrides=self.protocol_overrides,
        )

    @property
    def heartbeat(self) -> Heartbeat:
        """How soon a dead worker's item is handed on, for every queue of the plan (the study's setting)."""
        return self.study_spec(self.backbones[0]).heartbeat

    def imagenet_needed(self) -> list[str]:
        """Backbones whose ImageNet weights some stage loads (MoCo's start or the baseline)."""
        uses = self.moco_start == "imagenet" or self.baseline == "imagenet"
        return list(self.backbones) if uses else []


def load_plan(path: str | Path, *, roots: Mapping[str, str | None] | None = None) -> PaperPlan:
    """Read and validate a plan YAML; ``roots`` overrides ``data.<dataset>.root`` (--chexpert-root ...)."""
    raw = load_yaml(path)
    return parse_plan(raw, source=str(path), roots=roots)


def parse_plan(
    raw: Mapping[str, Any], *, source: str = "<plan>", roots: Mapping[str, str | None] | None = None
) -> PaperPlan:
    _check_keys(raw, _PLAN_KEYS, ("name", "data", "pretrain", "finetune", "stages"), f"{source}")
    name = str(raw["name"])
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", name):
        raise ConfigError(f"{source}: name={name!r}: use letters, digits, '.', '_' and '-' only")
    data = _data(_mapping(raw, "data", source), source, roots or {})
    phantom = build(Phantom, raw["phantom"], where=f"{source}: phantom") if raw.get("phantom") else None
    pre = _mapping(raw, "pretrain", source)
    _check_keys(pre, {"backbones", "study"}, ("backbones", "study"), f"{source}: pretrain")
    backbones = _backbones(pre["backbones"], f"{source}: pretrain.backbones")
    study = _mapping(pre, "study", f"{source}: pretrain")
    _check_keys(study, _STUDY_KEYS, ("budget", "search_space"), f"{source}: pretrain.study")
    ft = _mapping(raw, "finetune", source)
    _check_keys(ft, {"base", "protocol_overrides", "baseline"}, (), f"{source}: finetune")
    finetune = build(FinetuneConfig, ft.get("base") or {}, where=f"{source}: finetune.base")
    overrides = {str(k): dict(v) for k, v in (ft.get("protocol_overrides") or {}).items()}
    for protocol, values in overrides.items():
        override(finetune, values, where=f"{source}: finetune.protocol_overrides.{protocol}")
    baseline = str(ft.get("baseline", "imagenet"))
    if baseline not in ("imagenet", "random"):
        raise ConfigError(f"{source}: finetune.baseline={baseline!r}: expected imagenet or random")
    stages = _mapping(raw, "stages", source)
    _check_keys(stages, set(GRID_STAGES) | {"table2"}, (), f"{source}: stages")
    grids = {
        s: _grid_stage(s, stages[s], backbones, f"{source}: stages.{s}") for s in GRID_STAGES if s in stages
    }
    table2 = _table2(stages.get("table2"), backbones, f"{source}: stages.table2")
    rep = _mapping(raw, "report", source)
    plan = PaperPlan(
        name=name,
        source=source,
        data=data,
        phantom=phantom,
        backbones=backbones,
        study=study,
        finetune=finetune,
        protocol_overrides=overrides,
        baseline=baseline,
        grids=grids,
        table2=table2,
        replicates=coerce(rep.get("replicates", 500), int, f"{source}: report.replicates"),
        cost=build(Cost, raw.get("cost") or {}, where=f"{source}: cost"),
    )
    for backbone in backbones:  # every study value checked now, not after hours of other stages
        plan.study_spec(backbone)
    return plan


def _data(raw: Mapping[str, Any], source: str, roots: Mapping[str, str | None]) -> dict[str, DataConfig]:
    _check_keys(raw, set(DATASETS), DATASETS, f"{source}: data")
    out = {}
    for key in DATASETS:
        values = dict(raw[key] or {})
        if roots.get(key):
            values["root"] = str(roots[key])
        out[key] = build(DataConfig, values, where=f"{source}: data.{key}")
    return out


def _grid_stage(name: str, raw: Any, backbones: tuple[str, ...], where: str) -> GridStage:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    _check_keys(raw, {"backbones", "fractions", "draws", "epochs", "tasks"}, ("fractions",), where)
    stage_backbones = _backbones(raw.get("backbones", list(backbones)), f"{where}.backbones")
    missing = [b for b in stage_backbones if b not in backbones]
    if missing:
        raise ConfigError(
            f"{where}.backbones: {missing} are not pretrained by this plan (pretrain.backbones)"
        )
    fractions = _fractions(raw["fractions"], where)
    tasks: dict[str, str] = {}
    if name == "competition":
        if not isinstance(raw.get("tasks"), Mapping) or not raw["tasks"]:
            raise ConfigError(
                f"{where}.tasks: expected a mapping task -> uncertainty policy (ignore, ones, zeros)"
            )
        tasks = {str(t): coerce(p, Policy, f"{where}.tasks.{t}") for t, p in raw["tasks"].items()}
    elif "tasks" in raw:
        raise ConfigError(f"{where}.tasks: only the competition stage has per-task policies")
    return GridStage(
        name=name,
        dataset="shenzhen" if name == "shenzhen" else "chexpert",
        backbones=stage_backbones,
        fractions=fractions,
        draws=_per_fraction(raw.get("draws", 1), fractions, f"{where}.draws", complete=True),
        epochs=_per_fraction(raw.get("epochs") or {}, fractions, f"{where}.epochs", complete=False),
        tasks=tasks,
    )


def _table2(raw: Any, backbones: tuple[str, ...], where: str) -> Table2Stage | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping (backbone, fraction, protocol)")
    _check_keys(raw, {"backbone", "fraction", "protocol", "epochs"}, (), where)
    t2 = Table2Stage(
        backbone=str(raw.get("backbone", "resnet18")),
        fraction=coerce(raw.get("fraction", 1.0), float, f"{where}.fraction"),
        protocol=str(raw.get("protocol", "linear")),
        epochs=coerce(raw["epochs"], int, f"{where}.epochs") if raw.get("epochs") else None,
    )
    if t2.backbone not in backbones:
        raise ConfigError(f"{where}.backbone={t2.backbone!r} is not pretrained by this plan")
    if t2.protocol not in ("linear", "e2e") or not 0 < t2.fraction <= 1:
        raise ConfigError(f"{where}: protocol must be linear or e2e and fraction in (0, 1]")
    return t2


def _backbones(raw: Any, where: str) -> tuple[str, ...]:
    values = raw if isinstance(raw, list) else [raw]
    bad = [b for b in values if b not in BACKBONES]
    if bad or not values:
        raise ConfigError(f"{where}: {bad or raw!r}: expected a list of {', '.join(BACKBONES)}")
    return tuple(str(b) for b in values)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def select_stages(only: Sequence[str] | None) -> list[str]:
    """The stages to run, in plan order; ``only`` names some (unknown names are one clear error)."""
    if not only:
        return list(STAGE_NAMES)
    bad = [s for s in only if s not in STAGE_NAMES]
    if bad:
        raise ConfigError(f"--only {' '.join(bad)}: unknown stage; the stages are {', '.join(STAGE_NAMES)}")
    return [s for s in STAGE_NAMES if s in only]


__all__ = [
    "STAGE_NAMES",
    "Cost",
    "GridStage",
    "PaperPlan",
    "Phantom",
    "Table2Stage",
    "load_plan",
    "parse_plan",
    "select_stages",
]
