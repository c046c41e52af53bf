"""`mococxr demo --quick`: the whole flow on a tiny phantom leaves every expected object in MLflow."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mococxr.demo import REGISTERED_MODEL, run_demo


def _runs(experiment: str, kind: str) -> list:
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`mococxr.kind` = '{kind}'",
                              output_format="list")


@pytest.mark.slow
def test_quick_demo_logs_every_stage_and_reruns_idempotently(tmp_path, tracking_uri, capsys):
    made = run_demo(quick=True, workdir=tmp_path)
    out = capsys.readouterr().out
    client = MlflowClient()
    sweep_exp, finetune_exp = made["spec"].experiment, made["grid_spec"].experiment

    # the study: one parent run, one pretraining run per trial, one LoggedModel per epoch of each
    assert len(_runs(sweep_exp, "sweep")) == 1
    pretrain_runs = _runs(sweep_exp, "pretrain")
    assert len(pretrain_runs) == made["spec"].n_trials
    exp_id = client.get_experiment_by_name(sweep_exp).experiment_id
    for run in pretrain_runs:
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert sorted(int(m.tags["mococxr.checkpoint_epoch"]) for m in models) == sorted(epochs)
        assert all(m.metrics for m in models)  # metrics linked to each epoch's model

    # the promoted checkpoint
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "production")
    assert version.tags["mococxr.run_id"] in {r.info.run_id for r in pretrain_runs}

    # the grid: 2 inits x 2 protocols x (2 + 1 + 1) draws, all finished, under one parent
    finetunes = _runs(finetune_exp, "finetune")
    assert len(finetunes) == 16 and {r.info.status for r in finetunes} == {"FINISHED"}
    assert {r.data.tags["mococxr.init"] for r in finetunes} == {"random", "moco"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in finetunes}) == 1
    moco = [r for r in finetunes if r.data.tags["mococxr.init"] == "moco"]
    assert {r.data.tags["mococxr.registry_version"] for r in moco} == {str(version.version)}

    # the report run with its tables and a PNG
    reports = _runs(finetune_exp, "report")
    assert len(reports) == 1
    files = {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    nested = {a.path for d in files for a in client.list_artifacts(reports[0].info.run_id, d)}
    assert "report.md" in files and any(p.endswith(".png") for p in nested) and any(p.endswith(".tex") for p in nested)
    assert "AUC difference, paired" in out and "mlflow ui --backend-store-uri" in out and "optuna-dashboard" in out

    # a second run reuses everything: no new pretraining or fine-tune run, one more report
    again = run_demo(quick=True, workdir=tmp_path)
    assert (again["grid"].started, again["grid"].skipped) == (0, 16)
    assert again["study"].trials_run == []
    assert len(_runs(sweep_exp, "pretrain")) == made["spec"].n_trials
    assert len(_runs(finetune_exp, "finetune")) == 16
    assert len(_runs(finetune_exp, "report")) == 2
