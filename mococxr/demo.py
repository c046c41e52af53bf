"""``mococxr demo``: the whole MoCo-CXR flow on the embedded phantom (or a real dataset), end to end.

data -> Optuna study over pretraining (pruned) -> promote the best checkpoint to production ->
fine-tune grid (random [+ imagenet] vs the production checkpoint; linear and e2e; three label fractions;
several draws) -> paired bootstrap report. Every stage is idempotent, so a second run reuses what the
first one left: the study resumes with its remaining budget, the grid skips finished runs, and only
the report is rebuilt.

Each variant (the full demo, ``--quick``, a real dataset, and both together) has its own experiments,
study and registered model (:func:`demo_names`), so running them in any order never mixes their runs
in one report cell or moves another variant's ``@production`` alias.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from mococxr.console import script
from mococxr.errors import ConfigError

SPECS = resources.files("mococxr") / "specs"  # package data: works from a wheel as well as a clone


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is. ``full`` fits 15 minutes on 2 CPU cores; ``quick`` about 2 minutes."""

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


SIZES = {
    "full": DemoSize(n_images=1200, n_test=300, store_px=128, image_px=64, n_trials=4, pretrain_epochs=4,
                     fractions=(0.02, 0.1, 1.0), draws=(5, 2, 1), epochs=(15, 8, 4), replicates=500),
    "quick": DemoSize(n_images=240, n_test=60, store_px=64, image_px=48, n_trials=2, pretrain_epochs=2,
                      fractions=(0.1, 0.5, 1.0), draws=(2, 1, 1), epochs=(3, 2, 1), replicates=200),
}

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
        prefix = ("mococxr-demo-quick" if quick else "mococxr-demo") + ("" if dataset == "phantom" else f"-{dataset}")
    return DemoNames(
        prefix=prefix,
        study=f"{prefix}-{dataset}" if dataset == "phantom" else prefix,
        sweep_experiment=f"{prefix}-sweep",
        finetune_experiment=f"{prefix}-finetune",
        registered_model="mococxr-resnet18-" + prefix.removeprefix("mococxr-"),
        grid=f"{prefix}-{dataset}",
        data_dir="phantom-quick" if quick else "phantom",
    )


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def prepare_phantom(out: Path, size: DemoSize, seed: int = 0) -> Path:
    """Synthesize the phantom once; a folder that already holds this phantom is reused."""
    from mococxr.data.phantom import is_phantom_of, marker_text, synthesize

    params = {"size": size.store_px, "seed": seed, "layout": "chexpert", "n_valid": size.n_test}
    if is_phantom_of(out, size.n_images, **params):
        print(f"phantom dataset already at {out} ({marker_text(size.n_images, **params)}), reused")
        return out
    return Path(synthesize(out, size.n_images, **params))


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
    variant's preset (``SIZES``) but not its names: the tests run the full demo's names at a tiny size."""
    from mococxr.report.tables import build_report, format_report
    from mococxr.tracking.mlflow import current_store

    size = size or SIZES["quick" if quick else "full"]
    names = demo_names(quick=quick, dataset=dataset, prefix=prefix)
    workdir = Path(workdir).resolve()
    t_all = time.perf_counter()
    store = current_store(store)
    print(f"demo {names.prefix}: experiments {names.sweep_experiment}, {names.finetune_experiment}; "
          f"registered model {names.registered_model}", flush=True)

    t0 = _stage("1/5 data")
    prepared = _demo_data(dataset, root, task, workdir / "data" / names.data_dir, size)
    print(f"data ready in {time.perf_counter() - t0:.0f} s")

    t0 = _stage("2/5 Optuna study over MoCo pretraining (learning rate x scheduler, median pruning)")
    spec, study = _demo_study(prepared, names, size, store)
    print(f"study done in {time.perf_counter() - t0:.0f} s: best trial {study.best_trial} "
          f"val/linear_auc {study.best_value:.4f} -> {study.promoted_uri}")

    t0 = _stage("3/5 fine-tune grid (random vs MoCo; linear and e2e; label fractions x draws)")
    grid, grid_result = _demo_grid(prepared, names, size, store)
    print(f"grid done in {time.perf_counter() - t0:.0f} s ({grid_result.started} run(s), "
          f"{grid_result.skipped} reused)")

    t0 = _stage("4/5 paired bootstrap report")
    report = build_report(grid.experiment, out=workdir / "reports" / grid.name, n_replicates=size.replicates,
                          seed=0, task=prepared.config.task, store=store)
    print(f"report done in {time.perf_counter() - t0:.0f} s")

    _stage("5/5 where to look")
    print(format_report(report))
    print(f"\nthe whole demo took {time.perf_counter() - t_all:.0f} s")
    commands = next_commands(store, spec.storage, names, prepared.config, size)
    _print_commands(commands, names)
    return {"study": study, "grid": grid_result, "report": report, "spec": spec, "grid_spec": grid,
            "names": names, "commands": commands}


# -- what to type next ------------------------------------------------------------------------------------
# Every command printed here runs as printed from the folder the demo ran in: console scripts are named by
# their path in this Python's environment (``.venv/bin/mlflow``) unless that is what PATH finds anyway.
def as_typed(uri: str) -> str:
    """A sqlite URI under the current folder spelled relative to it (``sqlite:///mlruns/mlflow.db``)."""
    if not uri.startswith("sqlite:///"):
        return uri
    try:
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return uri


def _as_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def next_commands(store: Any, optuna_storage: str, names: DemoNames, data: Any, size: DemoSize) -> dict[str, list[str]]:
    """argv lists of what to run next: the MLflow UI, optuna-dashboard and one fine-tune of the promoted
    checkpoint (into its own experiment, so the demo's report cells stay one run each)."""
    from mococxr.config import DataConfig, flag_name
    from mococxr.tracking.mlflow import default_tracking_uri

    uri = as_typed(store.tracking_uri)
    commands: dict[str, list[str]] = {}
    if not uri.startswith(("http://", "https://")):
        commands["mlflow_ui"] = [script("mlflow") or "mlflow", "ui", "--backend-store-uri", uri, "--port", "5000"]
    commands["optuna_dashboard"] = [script("optuna-dashboard") or "optuna-dashboard", as_typed(optuna_storage),
                                    "--port", "8080"]
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
    commands["finetune"] = [
        *mococxr, *store_flag, "finetune",
        "--init", f"models:/{names.registered_model}@production", "--protocol", "e2e", "--fraction", "0.1",
        *data_flags, "--image-size", str(size.image_px), "--experiment", f"{names.prefix}-by-hand",
    ]
    return commands


def _print_commands(commands: dict[str, list[str]], names: DemoNames) -> None:
    print("browse everything (from this folder):")
    if "mlflow_ui" in commands:
        print(f"  {shlex.join(commands['mlflow_ui'])}   # http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    else:
        print("  the runs are on the tracking server: open its address in a browser")
    print(f"  {shlex.join(commands['optuna_dashboard'])}   # http://127.0.0.1:8080")
    if script("optuna-dashboard") is None:
        pip = script("pip") or "pip"
        print(f"  (optuna-dashboard is not installed here: {pip} install 'optuna-dashboard>=0.17')")
    print(f"fine-tune the promoted checkpoint yourself ({names.registered_model}@production):")
    print(f"  {shlex.join(commands['finetune'])}")


def _demo_data(dataset: str, root: str | None, task: str | None, phantom_dir: Path, size: DemoSize):
    """The demo's DataConfig: the phantom (made on first use) or a real dataset, checked and described."""
    from mococxr.config import DataConfig
    from mococxr.data.prepare import prepare
    from mococxr.data.records import check_dataset, summarize

    if dataset == "phantom":
        data_root = prepare_phantom(phantom_dir, size)
        data = DataConfig(dataset="chexpert", root=str(data_root), test_csv="CheXpert-v1.0-small/valid.csv",
                          task=task or "pleural_effusion", val=0.15)
    else:
        if not root:
            raise ConfigError(f"--root is required with --dataset {dataset}")
        data = DataConfig(dataset=dataset, root=str(root), task=task or "pneumonia", val=0.15, test=0.25)
    problems = check_dataset(data.dataset, data.root)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the data, first: {problems[0]}")
    prepared = prepare(data)  # once for the whole demo: the study's trials and every grid cell share it
    print(summarize(prepared.records, list(prepared.tasks)))
    return prepared


def _demo_study(prepared, names: DemoNames, size: DemoSize, store):
    """The shipped demo study with the demo's data, size and names; promotes its best to production."""
    from mococxr.config import load_yaml, to_dict
    from mococxr.sweep.study import parse_spec, run_study

    raw = load_yaml(SPECS / "demo.yaml")
    raw["name"] = names.study
    raw["experiment"] = names.sweep_experiment
    raw["storage"] = store.optuna_storage
    raw.setdefault("budget", {}).update(n_trials=size.n_trials, epochs=size.pretrain_epochs)
    raw["base"] = {**raw.get("base", {}), "data": to_dict(prepared.config), "image_size": size.image_px}
    raw["registered_model"] = names.registered_model
    spec = parse_spec(raw, source="mococxr/specs/demo.yaml (demo settings)")
    return spec, run_study(spec, promote="production", store=store, data=prepared)


def _demo_grid(prepared, names: DemoNames, size: DemoSize, store):
    """The shipped demo grid: random (+ imagenet when its weights are local) vs the production checkpoint."""
    import dataclasses

    from mococxr.config import FinetuneConfig, build, load_yaml
    from mococxr.models.backbones import available_imagenet_weights
    from mococxr.sweep.grid import GridSpec, run_grid

    grid_raw = load_yaml(SPECS / "demo_grid.yaml")
    base = build(FinetuneConfig, grid_raw.get("base") or {}, where="mococxr/specs/demo_grid.yaml: base")
    base = dataclasses.replace(base, data=prepared.config, image_size=size.image_px)
    inits = {"random": "random", "moco": f"models:/{names.registered_model}@production"}
    if available_imagenet_weights(base.backbone) is not None:
        inits = {"random": "random", "imagenet": "imagenet", "moco": inits["moco"]}
    grid = GridSpec(
        name=names.grid, experiment=names.finetune_experiment, base=base, inits=inits,
        protocols=["linear", "e2e"], fractions=list(size.fractions),
        draws=dict(zip(size.fractions, size.draws, strict=True)),
        epochs=dict(zip(size.fractions, size.epochs, strict=True)),
        protocol_overrides=grid_raw.get("protocol_overrides") or {},
    )
    result = run_grid(grid, store=store, data=prepared)
    if result.failed:
        raise ConfigError(f"{len(result.failed)} grid run(s) failed; first: {result.failed[0]}")
    return grid, result
