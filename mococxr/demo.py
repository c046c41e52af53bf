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
from pathlib import Path
from typing import Any

from mococxr.errors import ConfigError

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


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
) -> dict[str, Any]:
    """Run the demo; returns what it made (study result, grid result, report)."""
    import dataclasses

    from mococxr.config import DataConfig, FinetuneConfig, build, load_yaml, to_dict
    from mococxr.data.labels import resolve_tasks
    from mococxr.data.records import check_dataset, summarize
    from mococxr.report.tables import build_report
    from mococxr.sweep.grid import GridSpec, run_grid
    from mococxr.sweep.study import parse_spec, run_study
    from mococxr.tracking.mlflow import configure, default_tracking_uri
    from mococxr.train.data import load_records

    size = SIZES["quick" if quick else "full"]
    workdir = Path(workdir).resolve()
    if prefix is None:  # each dataset gets its own experiments, so reports never mix them
        prefix = ("mococxr-demo-quick" if quick else "mococxr-demo") + ("" if dataset == "phantom" else f"-{dataset}")
    t_all = time.perf_counter()
    uri = configure()

    t0 = _stage("1/5 data")
    if dataset == "phantom":
        data_root = prepare_phantom(workdir / "data" / ("phantom-quick" if quick else "phantom"), size)
        data = DataConfig(dataset="chexpert", root=str(data_root), test_csv="CheXpert-v1.0-small/valid.csv",
                          task=task or "pleural_effusion", val=0.15)
        problems = check_dataset("chexpert", data_root)
    else:
        if not root:
            raise ConfigError(f"--root is required with --dataset {dataset}")
        data = DataConfig(dataset=dataset, root=str(root), task=task or "pneumonia", val=0.15, test=0.25)
        problems = check_dataset(dataset, root)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the data, first: {problems[0]}")
    records = load_records(data)
    print(summarize(records, resolve_tasks(data.task, records)))
    print(f"data ready in {time.perf_counter() - t0:.0f} s")

    t0 = _stage("2/5 Optuna study over MoCo pretraining (learning rate x scheduler, median pruning)")
    raw = load_yaml(SWEEPS / "demo.yaml")
    raw["name"] = prefix if dataset != "phantom" else f"{prefix}-{dataset}"
    raw["experiment"] = f"{prefix}-sweep"
    raw["storage"] = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / 'optuna.db'}" \
        if uri.startswith("sqlite:///") else raw.get("storage")
    raw.setdefault("budget", {}).update(n_trials=size.n_trials, epochs=size.pretrain_epochs)
    raw["base"] = {**raw.get("base", {}), "data": to_dict(data), "image_size": size.image_px}
    raw["registered_model"] = f"{REGISTERED_MODEL}-{dataset}" if dataset != "phantom" else REGISTERED_MODEL
    spec = parse_spec(raw, source="sweeps/demo.yaml (demo settings)")
    study = run_study(spec, promote="production")
    print(f"study done in {time.perf_counter() - t0:.0f} s: best trial {study.best_trial} "
          f"val/linear_auc {study.best_value:.4f} -> {study.promoted_uri}")

    t0 = _stage("3/5 fine-tune grid (random vs MoCo; linear and e2e; label fractions x draws)")
    grid_raw = load_yaml(SWEEPS / "demo_grid.yaml")
    base = build(FinetuneConfig, grid_raw.get("base") or {}, where="sweeps/demo_grid.yaml: base")
    base = dataclasses.replace(base, data=data, image_size=size.image_px)
    inits = {"random": "random", "moco": f"models:/{spec.registered_model}@production"}
    from mococxr.models.backbones import available_imagenet_weights

    if available_imagenet_weights(base.backbone) is not None:
        inits = {"random": "random", "imagenet": "imagenet", **{"moco": inits["moco"]}}
    grid = GridSpec(
        name=f"{prefix}-{dataset}", experiment=f"{prefix}-finetune", base=base, inits=inits,
        protocols=["linear", "e2e"], fractions=list(size.fractions),
        draws=dict(zip(size.fractions, size.draws, strict=True)), epochs=dict(zip(size.fractions, size.epochs, strict=True)),
        protocol_overrides=grid_raw.get("protocol_overrides") or {},
    )
    grid_result = run_grid(grid)
    if grid_result.failed:
        raise ConfigError(f"{len(grid_result.failed)} grid run(s) failed; first: {grid_result.failed[0]}")
    print(f"grid done in {time.perf_counter() - t0:.0f} s ({grid_result.started} run(s), "
          f"{grid_result.skipped} reused)")

    t0 = _stage("4/5 paired bootstrap report")
    report = build_report(grid.experiment, out=workdir / "reports" / grid.name, n_replicates=size.replicates,
                          seed=0, task=data.task)
    print(f"report done in {time.perf_counter() - t0:.0f} s")

    _stage("5/5 where to look")
    from mococxr.cli import print_report

    print_report(report)
    store = uri if uri != default_tracking_uri() else "sqlite:///mlruns/mlflow.db"
    print(f"\nthe whole demo took {time.perf_counter() - t_all:.0f} s")
    print("browse everything:")
    print(f"  mlflow ui --backend-store-uri {store} --port 5000        # http://127.0.0.1:5000")
    print(f"  optuna-dashboard {spec.storage} --port 8080             # http://127.0.0.1:8080")
    return {"study": study, "grid": grid_result, "report": report, "spec": spec, "grid_spec": grid}
