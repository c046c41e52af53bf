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
    Protocol,
    Validated,
    build,
    coerce,
    load_yaml,
    opt,
    to_dict,
)
from mococxr.errors import ConfigError
from mococxr.sweep.grid_spec import CELL_KEYS, GridSpec, protocol_overrides
from mococxr.sweep.spec import (
    Heartbeat,
    StudySpec,
    _check_keys,
    _fractions,
    _mapping,
    _per_fraction,
    parse_spec,
)
from mococxr.sweep.spec_common import count, refuse_keys, shown, study_name, text

STAGE_NAMES = ("data", "pretrain", "chexpert", "shenzhen", "table2", "competition", "report")
GRID_STAGES = ("chexpert", "shenzhen", "competition")
DATASETS = ("chexpert", "shenzhen")
_PLAN_KEYS = frozenset({"name", "data", "phantom", "pretrain", "finetune", "stages", "report", "cost"})
_STUDY_KEYS = frozenset({"objective", "budget", "search_space", "sampler", "pruner", "heartbeat", "base"})
_SET_BY_PLAN = ("data", "backbone")  # each study and grid gets its data and backbone from the plan
_WHY = "the plan sets it per stage and backbone (data.<dataset>, pretrain.backbones, the stages)"
NAME_MAX = 100  # a plan's name starts its experiment, study, grid and registered model names
MAX_REPLICATES = 100_000  # a bootstrap draw is replicates x test images; 500 is the paper's


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

    def validate(self) -> None:
        if not self.gpu.strip():
            raise ConfigError(f"gpu={self.gpu!r}: name the GPU the gpu_img_s figures describe")


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
        return parse_spec(raw, source=f"{self.source}: pretrain.study ({backbone})")

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
    """Validate a plan mapping: every key, and every study and fine-tune config the plan will make, is
    checked here, so a bad plan fails before any stage runs (errors name ``source`` and the dotted key)."""
    _check_keys(raw, _PLAN_KEYS, ("name", "data", "pretrain", "finetune", "stages"), f"{source}")
    name = study_name(raw["name"], f"{source}: name")
    if len(name) > NAME_MAX:
        raise ConfigError(
            f"{source}: name={shown(name)}: expected at most {NAME_MAX} characters (it starts the name of "
            "every experiment, study and registered model of the plan)"
        )
    phantom = _mapping(raw, "phantom", source)
    backbones, study = _pretrain(_mapping(raw, "pretrain", source), f"{source}: pretrain")
    finetune, overrides, baseline = _finetune(_mapping(raw, "finetune", source), f"{source}: finetune")
    stages = _mapping(raw, "stages", source)
    _check_keys(stages, set(GRID_STAGES) | {"table2"}, (), f"{source}: stages")
    rep = _mapping(raw, "report", source)
    _check_keys(rep, {"replicates"}, (), f"{source}: report")
    plan = PaperPlan(
        name=name,
        source=source,
        data=_data(_mapping(raw, "data", source), source, roots or {}),
        phantom=build(Phantom, phantom, where=f"{source}: phantom") if phantom else None,
        backbones=backbones,
        study=study,
        finetune=finetune,
        protocol_overrides=overrides,
        baseline=baseline,
        grids={
            s: _grid_stage(s, stages[s], backbones, f"{source}: stages.{s}")
            for s in GRID_STAGES
            if s in stages
        },
        table2=_table2(stages.get("table2"), backbones, f"{source}: stages.table2"),
        replicates=count(rep.get("replicates", 500), f"{source}: report.replicates", high=MAX_REPLICATES),
        cost=build(Cost, _mapping(raw, "cost", source), where=f"{source}: cost"),
    )
    _check_configs(plan)
    return plan


def _pretrain(raw: dict[str, Any], where: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    _check_keys(raw, {"backbones", "study"}, ("backbones", "study"), where)
    backbones = _backbones(raw["backbones"], f"{where}.backbones")
    study = _mapping(raw, "study", where)
    _check_keys(study, _STUDY_KEYS, ("budget", "search_space"), f"{where}.study")
    for section in sorted(_STUDY_KEYS):  # mappings, named here with the plan's keys
        study[section] = _mapping(study, section, f"{where}.study")
    refuse_keys(study["base"], _SET_BY_PLAN, f"{where}.study.base", _WHY)
    return backbones, study


def _finetune(raw: dict[str, Any], where: str) -> tuple[FinetuneConfig, dict[str, dict[str, Any]], str]:
    _check_keys(raw, {"base", "protocol_overrides", "baseline"}, (), where)
    base = _mapping(raw, "base", where)
    refuse_keys(base, (*_SET_BY_PLAN, *CELL_KEYS), f"{where}.base", _WHY)
    finetune = build(FinetuneConfig, base, where=f"{where}.base")
    overrides = protocol_overrides(
        _mapping(raw, "protocol_overrides", where),
        finetune,
        f"{where}.protocol_overrides",
        (*_SET_BY_PLAN, *CELL_KEYS),
    )
    baseline = raw.get("baseline", "imagenet")
    if baseline not in ("imagenet", "random"):
        raise ConfigError(f"{where}.baseline={shown(baseline)}: expected imagenet or random")
    return finetune, overrides, str(baseline)


def _check_configs(plan: PaperPlan) -> None:
    """Make every study spec and every cell config of the plan once (Table 2's with a stand-in init): a
    value that only fails in combination fails now, not after hours of other stages."""
    for backbone in plan.backbones:
        plan.study_spec(backbone)
    grids = [(s, g) for s in plan.grids for g in plan.grid_specs(s)]
    if plan.table2 is not None:
        grids.append(("table2", plan.table2_grid({"check": "random"})))
    for stage, grid in grids:
        try:
            grid.configs()
        except ConfigError as exc:
            raise ConfigError(f"{plan.source}: stages.{stage} (grid {grid.name}): {exc}") from None


def _data(raw: Mapping[str, Any], source: str, roots: Mapping[str, str | None]) -> dict[str, DataConfig]:
    _check_keys(raw, set(DATASETS), DATASETS, f"{source}: data")
    out = {}
    for key in DATASETS:
        values = _mapping(raw, key, f"{source}: data")
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
        tasks = {
            text(t, f"{where}.tasks.{t}", what="a task"): coerce(p, Policy, f"{where}.tasks.{t}")
            for t, p in raw["tasks"].items()
        }
    elif "tasks" in raw:
        raise ConfigError(f"{where}.tasks: only the competition stage has per-task policies")
    return GridStage(
        name=name,
        dataset="shenzhen" if name == "shenzhen" else "chexpert",
        backbones=stage_backbones,
        fractions=fractions,
        draws=_per_fraction(raw.get("draws", 1), fractions, f"{where}.draws", complete=True),
        epochs=_per_fraction(
            {} if raw.get("epochs") is None else raw["epochs"], fractions, f"{where}.epochs", complete=False
        ),
        tasks=tasks,
    )


def _table2(raw: Any, backbones: tuple[str, ...], where: str) -> Table2Stage | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping (backbone, fraction, protocol)")
    _check_keys(raw, {"backbone", "fraction", "protocol", "epochs"}, (), where)
    t2 = Table2Stage(
        backbone=text(raw.get("backbone", "resnet18"), f"{where}.backbone", what="a backbone"),
        fraction=coerce(raw.get("fraction", 1.0), float, f"{where}.fraction"),
        protocol=coerce(raw.get("protocol", "linear"), Protocol, f"{where}.protocol"),
        epochs=None if raw.get("epochs") is None else count(raw["epochs"], f"{where}.epochs"),
    )
    if t2.backbone not in backbones:
        raise ConfigError(f"{where}.backbone={t2.backbone!r} is not pretrained by this plan")
    if not 0 < t2.fraction <= 1:
        raise ConfigError(f"{where}.fraction={t2.fraction:g}: expected a label fraction in (0, 1]")
    return t2


def _backbones(raw: Any, where: str) -> tuple[str, ...]:
    values = raw if isinstance(raw, list) else [raw]
    bad = [b for b in values if b not in BACKBONES]
    if bad or not values:
        raise ConfigError(f"{where}: {shown(bad or raw)}: expected a list of {', '.join(BACKBONES)}")
    if len(set(values)) < len(values):
        raise ConfigError(f"{where}={shown(raw)}: a backbone is listed twice")
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
