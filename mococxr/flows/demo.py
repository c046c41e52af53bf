"""``mococxr demo``: the whole MoCo-CXR flow as one small plan, on the embedded phantom or a real dataset.

The plan is ``mococxr/specs/demo_plan.yaml`` (package data), read and checked once; its stages run with
the plan machinery of :mod:`mococxr.flows.stages`: ``data`` (the phantom made once under the folder lock,
or a real dataset; prepared once for every stage), ``pretrain`` (an Optuna study over MoCo pretraining;
its best checkpoint registered and aliased ``production``), ``grid`` (random [+ imagenet] vs that
checkpoint, a work queue shared by the workers) and ``report`` (the paired bootstrap report, built once
among the workers; every worker prints its table). Every stage is idempotent, so a second run reuses
what the first left: the study resumes, the grid skips finished runs, the report is reused unless its
runs changed.

Each variant (the full demo, ``--quick``, a real dataset, and both together) has its own experiments,
study and registered model (:func:`demo_names`), so running them in any order never mixes their runs
in one report cell or moves another variant's ``@production`` alias.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from mococxr.config import DataConfig, FinetuneConfig, Protocol, build, coerce, load_yaml, override, to_dict
from mococxr.console import script
from mococxr.errors import ConfigError
from mococxr.flows import stages as st
from mococxr.sweep.grid_spec import GridSpec
from mococxr.sweep.spec import Heartbeat, _check_keys, _fractions, _mapping, _per_fraction, parse_spec

PLAN = resources.files("mococxr") / "specs" / "demo_plan.yaml"  # package data: a wheel or a clone
SOURCE = "mococxr/specs/demo_plan.yaml"
STAGES = ("data", "pretrain", "grid", "report")
TITLES = {
    "data": "data",
    "pretrain": "Optuna study over MoCo pretraining (learning rate x scheduler, median pruning)",
    "grid": "fine-tune grid (random vs MoCo; linear and e2e; label fractions x draws)",
    "report": "paired bootstrap report",
}
_KEYS = frozenset({"stages", "sizes", "data", "study", "grid", "report"})
_STUDY_KEYS = frozenset({"objective", "budget", "search_space", "sampler", "pruner", "heartbeat", "base"})
_PER_FRACTION = ("fractions", "draws", "epochs")


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is (``sizes`` in the plan: ``full`` takes ~6 minutes on 2 CPU cores, ``quick``
    ~40 s; the README's Measured table)."""

    n_images: int
    n_test: int  # the phantom's valid.csv, the test set: larger than CheXpert's 1/10 for tighter CIs
    store_px: int
    image_px: int
    n_trials: int
    pretrain_epochs: int
    fractions: tuple[float, ...]
    draws: tuple[int, ...]
    epochs: tuple[int, ...]  # fine-tune epochs per fraction (the paper's rule scaled to the demo)
    replicates: int


REGISTERED_MODEL = "mococxr-resnet18-demo"  # the full phantom demo's; see demo_names for the others


@dataclass(frozen=True)
class DemoNames:
    """The MLflow and Optuna names one demo variant owns; no two variants share any of them."""

    prefix: str
    study: str
    sweep_experiment: str
    finetune_experiment: str
    registered_model: str
    grid: str
    data_dir: str  # the phantom's folder under the demo's workdir


def demo_names(*, quick: bool = False, dataset: str = "phantom", prefix: str | None = None) -> DemoNames:
    """Names of the demo variant: ``mococxr-demo`` (full phantom), ``mococxr-demo-quick``,
    ``mococxr-demo-nih``, ``mococxr-demo-quick-nih``, ... and the registered model that goes with each
    (``mococxr-resnet18-demo``, ``mococxr-resnet18-demo-quick``, ...).

    The full phantom demo keeps the names it always had, so an existing store is reused as it is."""
    if prefix is None:
        suffix = "" if dataset == "phantom" else f"-{dataset}"
        prefix = ("mococxr-demo-quick" if quick else "mococxr-demo") + suffix
    return DemoNames(
        prefix=prefix,
        study=f"{prefix}-{dataset}" if dataset == "phantom" else prefix,
        sweep_experiment=f"{prefix}-sweep",
        finetune_experiment=f"{prefix}-finetune",
        registered_model="mococxr-resnet18-" + prefix.removeprefix("mococxr-"),
        grid=f"{prefix}-{dataset}",
        data_dir="phantom-quick" if quick else "phantom",
    )


@dataclass(frozen=True)
class DemoReport:
    """The report stage's result, the same in every worker: the report run and its table as printed."""

    run_id: str
    table: str


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoPlan:
    """A checked demo plan (``demo_plan.yaml``): everything the stages need, nothing run yet."""

    source: str
    stages: tuple[str, ...]
    sizes: dict[str, DemoSize]  # full, quick
    data: dict[str, Any]  # phantom_seed; phantom and dataset: DataConfig values (root: set by the demo)
    study: dict[str, Any]  # a study mapping without name, experiment, budget counts and data
    heartbeat: Heartbeat  # the study's: also the grid's and the report's leases
    inits: dict[str, str]  # label -> init; ``{registered_model}`` is the variant's
    protocols: tuple[str, ...]
    finetune: FinetuneConfig  # the grid's base (data and image size filled in per variant)
    protocol_overrides: dict[str, dict[str, Any]]
    report: dict[str, Any]  # seed, folder

    def data_config(self, dataset: str, root: str | Path, task: str | None = None) -> DataConfig:
        """The phantom's data at ``root`` (its folder under the demo's), or ``dataset``'s (--root)."""
        key = "phantom" if dataset == "phantom" else "dataset"
        values = {**self.data.get(key, {}), **({} if key == "phantom" else {"dataset": dataset})}
        values.update(root=str(root), **({"task": task} if task else {}))
        return build(DataConfig, values, where=f"{self.source}: data.{key}")

    def study_spec(self, names: DemoNames, size: DemoSize, data: DataConfig, storage: str | None = None):
        """The variant's study (a :class:`~mococxr.sweep.spec.StudySpec`) at ``size`` on ``data``."""
        counts = {"n_trials": size.n_trials, "epochs": size.pretrain_epochs}
        raw = {**self.study, "name": names.study, "experiment": names.sweep_experiment}
        raw.update(registered_model=names.registered_model, budget={**self.study.get("budget", {}), **counts})
        raw["base"] = {**self.study.get("base", {}), "data": to_dict(data), "image_size": size.image_px}
        return parse_spec({**raw, "storage": storage} if storage else raw, source=f"{self.source}: study")

    def grid_spec(self, names: DemoNames, size: DemoSize, data: DataConfig, storage: str | None = None):
        """The variant's grid at ``size`` on ``data``; an ``imagenet`` init only when its weights are here."""
        from mococxr.models.backbones import available_imagenet_weights

        base = replace(self.finetune, data=data, image_size=size.image_px)
        local = available_imagenet_weights(base.backbone) is not None
        inits = {k: v.replace("{registered_model}", names.registered_model) for k, v in self.inits.items()}
        fractions = list(size.fractions)
        return GridSpec(
            name=names.grid,
            experiment=names.finetune_experiment,
            base=base,
            inits={k: v for k, v in inits.items() if v != "imagenet" or local},
            protocols=list(self.protocols),
            fractions=fractions,
            draws=dict(zip(fractions, size.draws, strict=True)),
            epochs=dict(zip(fractions, size.epochs, strict=True)),
            protocol_overrides=self.protocol_overrides,
            heartbeat=self.heartbeat,
            storage=storage,
        )


def load_demo_plan(path: str | Path | None = None) -> DemoPlan:
    """Read and check the demo plan (default: the shipped ``demo_plan.yaml``); errors name the key."""
    return parse_demo_plan(load_yaml(path or PLAN), source=str(path or SOURCE))


def parse_demo_plan(raw: Mapping[str, Any], *, source: str = "<demo plan>") -> DemoPlan:
    _check_keys(raw, _KEYS, ("stages", "sizes", "study", "grid"), source)
    stages = raw["stages"] if isinstance(raw["stages"], list) else [raw["stages"]]
    if [s for s in STAGES if s in stages] != stages:
        raise ConfigError(f"{source}: stages={raw['stages']!r}: use some of {', '.join(STAGES)}, in order")
    sizes = _mapping(raw, "sizes", source)
    _check_keys(sizes, {"full", "quick"}, ("full", "quick"), f"{source}: sizes")
    data = _mapping(raw, "data", source)
    _check_keys(data, {"phantom_seed", "phantom", "dataset"}, (), f"{source}: data")
    study, report = _mapping(raw, "study", source), _mapping(raw, "report", source)
    _check_keys(study, _STUDY_KEYS, ("search_space",), f"{source}: study")
    _check_keys(report, {"seed", "folder"}, (), f"{source}: report")
    plan = DemoPlan(
        source=source,
        stages=tuple(stages),
        sizes={k: _size(v, f"{source}: sizes.{k}") for k, v in sizes.items()},
        data={
            "phantom_seed": coerce(data.get("phantom_seed", 0), int, f"{source}: data.phantom_seed"),
            **{k: _mapping(data, k, f"{source}: data") for k in ("phantom", "dataset")},
        },
        study=study,
        heartbeat=build(Heartbeat, _mapping(study, "heartbeat", source), where=f"{source}: study.heartbeat"),
        **_grid(_mapping(raw, "grid", source), f"{source}: grid"),
        report={
            "seed": coerce(report.get("seed", 0), int, f"{source}: report.seed"),
            "folder": str(report.get("folder", "reports")),
        },
    )
    plan.data_config("nih", "data/nih")  # every value checked now, not after hours of other stages
    for size in plan.sizes.values():
        plan.study_spec(demo_names(), size, plan.data_config("phantom", "data/phantom"))
    return plan


def _grid(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The grid section: inits, protocols, the fine-tune base and the protocols' overrides, checked."""
    _check_keys(raw, {"inits", "protocols", "base", "protocol_overrides"}, ("inits", "protocols"), where)
    inits = {str(k): str(v) for k, v in _mapping(raw, "inits", where).items()}
    protocols = raw["protocols"] if isinstance(raw["protocols"], list) else [raw["protocols"]]
    finetune = build(FinetuneConfig, _mapping(raw, "base", where), where=f"{where}.base")
    overrides = _mapping(raw, "protocol_overrides", where)
    for protocol in overrides:
        key = f"{where}.protocol_overrides.{coerce(protocol, Protocol, f'{where}.protocol_overrides')}"
        overrides[protocol] = _mapping(overrides, protocol, key)
        override(finetune, overrides[protocol], where=key)  # checked now, not halfway through the grid
    return {
        "inits": inits,
        "protocols": tuple(coerce(p, Protocol, f"{where}.protocols") for p in protocols),
        "finetune": finetune,
        "protocol_overrides": overrides,
    }


def _size(raw: Any, where: str) -> DemoSize:
    names = [f.name for f in fields(DemoSize)]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(names)}")
    _check_keys(raw, set(names), tuple(names), where)
    counts = {k: coerce(raw[k], int, f"{where}.{k}") for k in names if k not in _PER_FRACTION}
    for key, value in counts.items():
        if value < 1:
            raise ConfigError(f"{where}.{key}={value}: must be at least 1")
    fractions = _fractions(raw["fractions"], where)
    per = {k: _per_fraction(raw[k], fractions, f"{where}.{k}", complete=True) for k in ("draws", "epochs")}
    draws, epochs = (tuple(per[k][f] for f in fractions) for k in ("draws", "epochs"))
    return DemoSize(**counts, fractions=tuple(fractions), draws=draws, epochs=epochs)


# -- running it -------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One worker's run of the plan: what it was asked for and what each stage made."""

    plan: DemoPlan
    names: DemoNames
    size: DemoSize
    store: Any
    data: DataConfig
    spec: Any  # the study's StudySpec
    grid: GridSpec
    workdir: Path
    phantom: bool  # the demo makes its data (else a real dataset's root was given)
    prepared: Any = None
    study: Any = None
    grid_result: Any = None
    report: DemoReport | None = None


def run_demo(
    *,
    quick: bool = False,
    dataset: str = "phantom",
    root: str | None = None,
    task: str | None = None,
    workdir: str | Path = ".",
    prefix: str | None = None,
    store: Any = None,
    size: DemoSize | None = None,
) -> dict[str, Any]:
    """Run the demo; returns what it made (study result, grid result, report, names, printed commands).

    ``store`` is the tracking store the caller opened (``tracking.mlflow.open_store``); by default the
    store in force (``$MLFLOW_TRACKING_URI`` or the embedded ``mlruns/mlflow.db``). ``size`` replaces the
    variant's size (``sizes`` in the plan) but not its names: the tests run the full demo's names at a
    tiny size. The ``report`` returned is a :class:`DemoReport`."""
    from mococxr.tracking.mlflow import current_store

    plan = load_demo_plan()
    size = size or plan.sizes["quick" if quick else "full"]
    names = demo_names(quick=quick, dataset=dataset, prefix=prefix)
    workdir = Path(workdir).resolve()
    t_all = time.perf_counter()
    store = current_store(store)
    if dataset != "phantom" and not root:
        raise ConfigError(f"--root is required with --dataset {dataset}")
    data = plan.data_config(dataset, root or workdir / "data" / names.data_dir, task)
    spec = plan.study_spec(names, size, data, store.optuna_storage)
    grid = plan.grid_spec(names, size, data, store.optuna_storage)
    run = _Run(plan, names, size, store, data, spec, grid, workdir, phantom=dataset == "phantom")
    experiments = f"experiments {names.sweep_experiment}, {names.finetune_experiment}"
    st.say(f"demo {names.prefix}: {experiments}; registered model {names.registered_model}")
    total = len(plan.stages) + 1
    for n, stage in enumerate(plan.stages, 1):
        t0 = _stage(f"{n}/{total} {TITLES[stage]}")
        what, detail = _STAGE_FUNCTIONS[stage](run)
        print(f"{what} in {time.perf_counter() - t0:.0f} s{detail}", flush=True)

    _stage(f"{total}/{total} where to look")
    if run.report is not None:
        print(run.report.table)
    print(f"\nthe whole demo took {time.perf_counter() - t_all:.0f} s")
    commands = next_commands(store, store.optuna_storage, names, data, size)
    _print_commands(commands, names)
    made = {"study": run.study, "grid": run.grid_result, "report": run.report, "spec": spec}
    return {**made, "grid_spec": grid, "names": names, "commands": commands}


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _stage_data(run: _Run) -> tuple[str, str]:
    """The phantom (made on first use) or a real dataset, checked, described and prepared once: the
    study's trials and every grid cell share it."""
    from mococxr.data.prepare import prepare
    from mococxr.data.records import check_dataset, summarize

    if run.phantom:
        params = {"size": run.size.store_px, "seed": run.plan.data["phantom_seed"], "layout": "chexpert"}
        st.make_phantom(run.data.root, run.size.n_images, **params, n_valid=run.size.n_test)
    problems = check_dataset(run.data.dataset, run.data.root)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the data, first: {problems[0]}")
    run.prepared = prepare(run.data)
    print(summarize(run.prepared.records, list(run.prepared.tasks)))
    return "data ready", ""


def _stage_pretrain(run: _Run) -> tuple[str, str]:
    """The study, run to its budget; its best checkpoint registered and aliased production."""
    from mococxr.sweep.study import run_study

    study = run.study = run_study(run.spec, promote="production", store=run.store, data=run.prepared)
    best = f"best trial {study.best_trial} {run.spec.metric} {study.best_value:.4f} -> {study.promoted_uri}"
    return "study done", f": {best}"


def _stage_grid(run: _Run) -> tuple[str, str]:
    """Work on the grid's queue with the other workers until none of its cells is left."""
    from mococxr.sweep.grid import run_grid

    result = run.grid_result = run_grid(run.grid, store=run.store, data=run.prepared)
    if result.failed:
        raise ConfigError(f"{len(result.failed)} grid run(s) failed; first: {result.failed[0]}")
    return "grid done", f" ({result.started} run(s), {result.skipped} reused)"


def _stage_report(run: _Run) -> tuple[str, str]:
    """The report of the grid's finished runs, built once among the workers (again only when its inputs
    changed: the runs, the replicates, the seed, the task, the folder); every worker gets its table."""
    from mococxr.report.tables import build_report, format_report
    from mococxr.sweep.queue import run_once
    from mococxr.tracking.runs import finished_hashes

    grid, out = run.grid, run.workdir / run.plan.report["folder"] / run.grid.name
    task, replicates, seed = run.data.task, run.size.replicates, run.plan.report["seed"]

    def build() -> dict[str, str]:
        made = build_report(
            grid.experiment, out=out, n_replicates=replicates, seed=seed, task=task, store=run.store
        )
        return {"run_id": str(made.run_id), "table": format_report(made)}

    key = st.digest([*sorted(finished_hashes(grid.experiment).values()), replicates, seed, task, out])
    done = run_once(
        f"{grid.name}.report.{key}", run.store.optuna_storage, build, heartbeat=run.plan.heartbeat, say=st.say
    )
    run.report = DemoReport(run_id=done["run_id"], table=done["table"])
    return "report done", ""


_STAGE_FUNCTIONS = {
    "data": _stage_data,
    "pretrain": _stage_pretrain,
    "grid": _stage_grid,
    "report": _stage_report,
}


# -- what to type next ------------------------------------------------------------------------------------
# Every command printed here runs as printed from the folder the demo ran in: console scripts are named by
# their path in this Python's environment (``.venv/bin/mlflow``) unless that is what PATH finds anyway.
def as_typed(uri: str) -> str:
    """A sqlite URI under the current folder spelled relative to it (``sqlite:///mlruns/mlflow.db``)."""
    if not uri.startswith("sqlite:///"):
        return uri
    return "sqlite:///" + _as_path(uri.removeprefix("sqlite:///"))  # the URI itself when not under it


def _as_path(path: str) -> str:
    """``path`` relative to the current folder when it is under it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def next_commands(
    store: Any, optuna_storage: str, names: DemoNames, data: Any, size: DemoSize
) -> dict[str, list[str]]:
    """argv lists of what to run next: the MLflow UI, optuna-dashboard and one fine-tune of the promoted
    checkpoint (into its own experiment, so the demo's report cells stay one run each)."""
    from mococxr.config import flag_name
    from mococxr.tracking.mlflow import default_tracking_uri

    uri = as_typed(store.tracking_uri)
    commands: dict[str, list[str]] = {}
    if not uri.startswith(("http://", "https://")):
        mlflow = script("mlflow") or "mlflow"
        commands["mlflow_ui"] = [mlflow, "ui", "--backend-store-uri", uri, "--port", "5000"]
    dashboard = script("optuna-dashboard") or "optuna-dashboard"
    commands["optuna_dashboard"] = [dashboard, as_typed(optuna_storage), "--port", "8080"]
    store_flag = [] if store.tracking_uri == default_tracking_uri() else ["--tracking-uri", uri]
    data_flags: list[str] = []
    for f in fields(DataConfig):
        value, flag = getattr(data, f.name), flag_name(f.name)
        if value == getattr(DataConfig(), f.name):
            continue
        if isinstance(value, bool):
            data_flags.append(flag if value else "--no-" + flag[2:])
        else:
            data_flags += [flag, _as_path(value) if f.name == "root" else str(value)]
    mococxr = [script("mococxr")] if script("mococxr") else [sys.executable, "-m", "mococxr"]
    init = [
        "--init",
        f"models:/{names.registered_model}@production",
        "--protocol",
        "e2e",
        "--fraction",
        "0.1",
    ]
    rest = ["--image-size", str(size.image_px), "--experiment", f"{names.prefix}-by-hand"]
    commands["finetune"] = [*mococxr, *store_flag, "finetune", *init, *data_flags, *rest]
    return commands


def _print_commands(commands: dict[str, list[str]], names: DemoNames) -> None:
    print("browse everything (from this folder):")
    if "mlflow_ui" in commands:
        ui = "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
        print(f"  {shlex.join(commands['mlflow_ui'])}   # {ui}")
    else:
        print("  the runs are on the tracking server: open its address in a browser")
    print(f"  {shlex.join(commands['optuna_dashboard'])}   # http://127.0.0.1:8080")
    if script("optuna-dashboard") is None:
        pip = script("pip") or "pip"
        print(f"  (optuna-dashboard is not installed here: {pip} install 'optuna-dashboard>=0.17')")
    print(f"fine-tune the promoted checkpoint yourself ({names.registered_model}@production):")
    print(f"  {shlex.join(commands['finetune'])}")
