"""``mococxr demo``: the whole MoCo-CXR flow on the embedded phantom (or a real dataset), end to end.

data -> Optuna study over pretraining (pruned) -> promote the best checkpoint to production ->
fine-tune grid (random [+ imagenet] vs the production checkpoint; linear and e2e; three label fractions;
several draws) -> paired bootstrap report. Every stage is idempotent, so a second run reuses what the
first one left: the study resumes with its remaining budget, the grid skips finished runs, and only
the report is rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

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

REGISTERED_MODEL = "mococxr-resnet18-demo"


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def prepare_phantom(out: Path, size: DemoSize, seed: int = 0) -> Path:
    """Synthesize the phantom once; a marker file makes a second demo run reuse it."""
    from mococxr.data.phantom import synthesize

    marker = out / ".mococxr-phantom"
    wanted = f"n={size.n_images} n_valid={size.n_test} size={size.store_px} seed={seed}"
    if marker.is_file() and marker.read_text().strip() == wanted:
        print(f"phantom dataset already at {out} ({wanted}), reused")
        return out
    root = synthesize(out, size.n_images, size=size.store_px, seed=seed, layout="chexpert", n_valid=size.n_test)
    marker.write_text(wanted + "\n")
    return Path(root)


def run_demo(
    *,
    quick: bool = False,
    dataset: str = "phantom",
    root: str | None = None,
    task: str | None = None,
    workdir: str | Path = ".",
    prefix: str | None = None,
    store: Any = None,
) -> dict[str, Any]:
    """Run the demo; returns what it made (study result, grid result, report).

    ``store`` is the tracking store the caller opened (``tracking.mlflow.open_store``); by default the
    store in force (``$MLFLOW_TRACKING_URI`` or the embedded ``mlruns/mlflow.db``)."""
    from mococxr.report.tables import build_report, format_report
    from mococxr.tracking.mlflow import current_store, default_tracking_uri

    size = SIZES["quick" if quick else "full"]
    workdir = Path(workdir).resolve()
    if prefix is None:  # each dataset gets its own experiments, so reports never mix them
        prefix = ("mococxr-demo-quick" if quick else "mococxr-demo") + ("" if dataset == "phantom" else f"-{dataset}")
    t_all = time.perf_counter()
    store = current_store(store)

    t0 = _stage("1/5 data")
    prepared = _demo_data(dataset, root, task, workdir / "data" / ("phantom-quick" if quick else "phantom"), size)
    print(f"data ready in {time.perf_counter() - t0:.0f} s")

    t0 = _stage("2/5 Optuna study over MoCo pretraining (learning rate x scheduler, median pruning)")
    data = prepared.config
    spec, study = _demo_study(prepared, dataset, prefix, size, store)
    print(f"study done in {time.perf_counter() - t0:.0f} s: best trial {study.best_trial} "
          f"val/linear_auc {study.best_value:.4f} -> {study.promoted_uri}")

    t0 = _stage("3/5 fine-tune grid (random vs MoCo; linear and e2e; label fractions x draws)")
    grid, grid_result = _demo_grid(prepared, dataset, prefix, size, spec.registered_model, store)
    print(f"grid done in {time.perf_counter() - t0:.0f} s ({grid_result.started} run(s), "
          f"{grid_result.skipped} reused)")

    t0 = _stage("4/5 paired bootstrap report")
    report = build_report(grid.experiment, out=workdir / "reports" / grid.name, n_replicates=size.replicates,
                          seed=0, task=data.task, store=store)
    print(f"report done in {time.perf_counter() - t0:.0f} s")

    _stage("5/5 where to look")
    print(format_report(report))
    uri = store.tracking_uri if store.tracking_uri != default_tracking_uri() else "sqlite:///mlruns/mlflow.db"
    print(f"\nthe whole demo took {time.perf_counter() - t_all:.0f} s")
    print("browse everything:")
    print(f"  mlflow ui --backend-store-uri {uri} --port 5000        # http://127.0.0.1:5000")
    print(f"  optuna-dashboard {spec.storage} --port 8080             # http://127.0.0.1:8080")
    return {"study": study, "grid": grid_result, "report": report, "spec": spec, "grid_spec": grid}


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


def _demo_study(prepared, dataset: str, prefix: str, size: DemoSize, store):
    """The shipped demo study with the demo's data, size and names; promotes its best to production."""
    from mococxr.config import load_yaml, to_dict
    from mococxr.sweep.study import parse_spec, run_study

    raw = load_yaml(SPECS / "demo.yaml")
    raw["name"] = prefix if dataset != "phantom" else f"{prefix}-{dataset}"
    raw["experiment"] = f"{prefix}-sweep"
    raw["storage"] = store.optuna_storage
    raw.setdefault("budget", {}).update(n_trials=size.n_trials, epochs=size.pretrain_epochs)
    raw["base"] = {**raw.get("base", {}), "data": to_dict(prepared.config), "image_size": size.image_px}
    raw["registered_model"] = f"{REGISTERED_MODEL}-{dataset}" if dataset != "phantom" else REGISTERED_MODEL
    spec = parse_spec(raw, source="mococxr/specs/demo.yaml (demo settings)")
    return spec, run_study(spec, promote="production", store=store, data=prepared)


def _demo_grid(prepared, dataset: str, prefix: str, size: DemoSize, registered_model: str, store):
    """The shipped demo grid: random (+ imagenet when its weights are local) vs the production checkpoint."""
    import dataclasses

    from mococxr.config import FinetuneConfig, build, load_yaml
    from mococxr.models.backbones import available_imagenet_weights
    from mococxr.sweep.grid import GridSpec, run_grid

    grid_raw = load_yaml(SPECS / "demo_grid.yaml")
    base = build(FinetuneConfig, grid_raw.get("base") or {}, where="mococxr/specs/demo_grid.yaml: base")
    base = dataclasses.replace(base, data=prepared.config, image_size=size.image_px)
    inits = {"random": "random", "moco": f"models:/{registered_model}@production"}
    if available_imagenet_weights(base.backbone) is not None:
        inits = {"random": "random", "imagenet": "imagenet", "moco": inits["moco"]}
    grid = GridSpec(
        name=f"{prefix}-{dataset}", experiment=f"{prefix}-finetune", base=base, inits=inits,
        protocols=["linear", "e2e"], fractions=list(size.fractions),
        draws=dict(zip(size.fractions, size.draws, strict=True)),
        epochs=dict(zip(size.fractions, size.epochs, strict=True)),
        protocol_overrides=grid_raw.get("protocol_overrides") or {},
    )
    result = run_grid(grid, store=store, data=prepared)
    if result.failed:
        raise ConfigError(f"{len(result.failed)} grid run(s) failed; first: {result.failed[0]}")
    return grid, result
