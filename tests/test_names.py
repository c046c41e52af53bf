"""Names a user may choose (quotes, backslashes, unicode) carried end to end through the CLI: a plan's
experiments, study, registered model, grid and report are all named after it, and every MLflow search on
the way is built by tracking/filters.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mococxr.flows.plan import load_plan

REPO = Path(__file__).resolve().parents[1]
PHANTOM = REPO / "sweeps" / "paper_phantom.yaml"


def _tiny_plan(name: str) -> dict:
    """sweeps/paper_phantom.yaml cut to one backbone, one trial of one epoch and one CheXpert grid."""
    raw = yaml.safe_load(PHANTOM.read_text())
    raw["name"] = name
    raw["phantom"].update(chexpert_n=120, chexpert_valid=40, shenzhen_n=40)
    pre = raw["pretrain"]
    pre["backbones"] = ["resnet18"]
    pre["study"]["budget"] = {"n_trials": 1, "epochs": 1}
    pre["study"]["search_space"]["lr"] = {"choices": [1.0e-3]}
    raw["stages"] = {"chexpert": {"fractions": [1.0], "draws": 1, "epochs": {1.0: 1}}}
    raw["finetune"]["protocol_overrides"]["linear"]["linear_lrs"] = [1.0e-3]
    raw["report"] = {"replicates": 20}
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("name", ["it's a\\b é✓"])
def test_a_plan_named_with_quotes_backslashes_and_unicode_runs_end_to_end(tmp_path, name):
    spec = tmp_path / "plan.yaml"
    spec.write_text(yaml.safe_dump(_tiny_plan(name), allow_unicode=True))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MOCOCXR_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "PYTHONUNBUFFERED": "1"}

    def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mococxr", "--tracking-uri", uri, *args]
        return subprocess.run(
            command, cwd=tmp_path, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout
        )

    run = cli("paper", str(spec), "--only", "data", "pretrain", "chexpert", "report", timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "internal error" not in run.stdout + run.stderr
    plan = load_plan(spec)
    experiment = plan.experiment("chexpert")
    assert "'" in experiment and "\\" in experiment and "é" in experiment
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    finetunes = client.search_runs([exp.experiment_id], "tags.`mococxr.kind` = 'finetune'")
    reports = client.search_runs([exp.experiment_id], "tags.`mococxr.kind` = 'report'")
    assert len(finetunes) == 4 and all(
        r.info.status == "FINISHED" for r in finetunes
    )  # 2 inits x 2 protocols
    assert [r.info.run_name for r in reports] == ["paper-chexpert"]
    assert client.get_registered_model(plan.registered_model("resnet18")).latest_versions is not None

    # the report and the registry commands take the same names from the command line
    report = cli("report", "--experiment", experiment, "--out", str(tmp_path / "rep"), "--replicates", "20")
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    listed = cli("registry", "list", "--name", plan.registered_model("resnet18"))
    assert listed.returncode == 0 and "production" in listed.stdout, listed.stdout + listed.stderr


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
