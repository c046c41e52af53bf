"""One default store for every command: with neither ``--tracking-uri`` nor ``$MLFLOW_TRACKING_URI``,
everything a command logs lands in ``./mlruns/mlflow.db`` (artifacts ``./mlruns/artifacts``, Optuna
``./mlruns/optuna.db``) of the folder it runs in, and nothing in MLflow's own default (``./mlflow.db``,
``./mlruns/0``, ``./mlartifacts``).

Every subcommand that touches tracking runs in-process (``mococxr.cli.main``) in a fresh folder, on a
40-image phantom at 32 px for one epoch, in the order a user would run them.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mococxr.cli import main

DATA = ["--root", "data/ph", "--test-csv", "CheXpert-v1.0-small/valid.csv", "--val", "0.3"]
TINY = ["--image-size", "32", "--batch-size", "8", "--workers", "0"]
MODEL = "test-default-store"
# What the store folder may hold: MLflow's and Optuna's databases (with the lock open_store takes while
# creating tables) and the artifact folder. Anything else is a store opened somewhere else by mistake.
STORE_FILES = {"mlflow.db", "mlflow.db.lock", "optuna.db", "artifacts"}


@pytest.fixture()
def fresh_project(tmp_path, monkeypatch) -> Path:
    """``tmp_path`` as the current folder of a process that was told nothing about a store."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MOCOCXR_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    # Forget the store an earlier test of this process pointed MLflow at, as a new process would.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    return tmp_path


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"mococxr {' '.join(argv)} exited {code}: {err[-2000:]}"
    return out


def _specs(root: Path) -> tuple[str, str]:
    data = {"dataset": "chexpert", "root": "data/ph", "test_csv": "CheXpert-v1.0-small/valid.csv", "val": 0.3}
    grid = _write(
        root / "grid.yaml",
        {
            "name": "t-grid",
            "experiment": "t-grid",
            "base": {"data": data, "image_size": 32, "batch_size": 8, "epochs": 1, "lr": 1e-3},
            "inits": {"random": "random", "moco": f"models:/{MODEL}@production"},
            "protocols": ["linear"],
            "fractions": [1.0],
            "draws": 1,
        },
    )
    study = _write(
        root / "study.yaml",
        {  # no storage: the default one
            "name": "t-study",
            "experiment": "t-sweep",
            "budget": {"n_trials": 1, "epochs": 1},
            "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}},
            "base": {
                "data": data,
                "init": "random",
                "image_size": 32,
                "batch_size": 8,
                "moco_k": 16,
                "workers": 0,
            },
        },
    )
    return grid, study


@pytest.mark.slow
def test_every_command_uses_the_project_store_by_default(fresh_project, capsys):
    root = fresh_project
    _run(["data", "synth", "--out", "data/ph", "--n", "40", "--size", "48", "--seed", "1"], capsys)
    out = _run(
        [
            "pretrain",
            *DATA,
            *TINY,
            "--init",
            "random",
            "--epochs",
            "1",
            "--moco-k",
            "16",
            "--experiment",
            "t-pretrain",
        ],
        capsys,
    )
    run_id = re.search(r"pretraining run (\w+)", out).group(1)
    _run(["registry", "register", "--name", MODEL, "--run-id", run_id, "--epoch", "1"], capsys)
    _run(["registry", "promote", "--name", MODEL, "--version", "1", "--stage", "production"], capsys)
    assert MODEL in _run(["registry", "list"], capsys)
    # exactly the form the demo and `sweep --promote` print
    _run(
        [
            "finetune",
            "--init",
            f"models:/{MODEL}@production",
            *DATA,
            *TINY,
            "--epochs",
            "1",
            "--experiment",
            "t-finetune",
        ],
        capsys,
    )
    _run(
        [
            "linear-eval",
            "--init",
            f"models:/{MODEL}@production",
            *DATA,
            "--image-size",
            "32",
            "--workers",
            "0",
        ],
        capsys,
    )
    grid, study = _specs(root)
    _run(["grid", grid], capsys)
    _run(["sweep", study], capsys)
    _run(["report", "--experiment", "t-grid", "--out", "reports/t", "--replicates", "20"], capsys)

    store = root / "mlruns"
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    assert {p.name for p in store.iterdir()} <= STORE_FILES, sorted(p.name for p in store.iterdir())
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}", registry_uri=f"sqlite:///{store / 'mlflow.db'}")
    artifacts = (store / "artifacts").as_uri()
    for name in ("t-pretrain", "t-finetune", "t-grid", "t-sweep"):
        exp = client.get_experiment_by_name(name)
        assert exp is not None, f"experiment {name} is not in {store / 'mlflow.db'}"
        assert exp.artifact_location.startswith(artifacts), exp.artifact_location
        runs = client.search_runs([exp.experiment_id])
        assert runs and all(r.info.artifact_uri.startswith(artifacts) for r in runs)
    kinds = {
        r.data.tags.get("mococxr.kind")
        for r in client.search_runs([client.get_experiment_by_name("t-grid").experiment_id])
    }
    assert {"grid", "finetune", "report"} <= kinds
    assert str(client.get_model_version_by_alias(MODEL, "production").version) == "1"
    assert "t-study" in optuna.get_all_study_names(f"sqlite:///{store / 'optuna.db'}")
