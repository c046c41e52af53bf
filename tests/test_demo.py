"""`mococxr demo`: the whole flow on a tiny phantom leaves every expected object in MLflow, its variants
never share a name, every command it prints runs as printed, and its plan (demo_plan.yaml) is checked
once with errors that name the key."""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mococxr.cli import build_parser
from mococxr.config import load_yaml
from mococxr.errors import ConfigError
from mococxr.flows.demo import (
    PLAN,
    REGISTERED_MODEL,
    DemoSize,
    demo_names,
    load_demo_plan,
    parse_demo_plan,
    run_demo,
)
from mococxr.report.record import report_dir

# A size smaller than --quick's: the test of "quick -> full -> quick" runs both variants' names at it.
TINY = DemoSize(
    n_images=120,
    n_test=40,
    store_px=48,
    image_px=32,
    n_trials=2,
    pretrain_epochs=1,
    fractions=(0.5, 1.0),
    draws=(1, 1),
    epochs=(1, 1),
    replicates=50,
)


def _runs(experiment: str, kind: str) -> list:
    return mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.`mococxr.kind` = '{kind}'", output_format="list"
    )


def _sqlite_file(uri: str) -> Path:
    assert uri.startswith("sqlite:///"), uri
    return Path(uri.removeprefix("sqlite:///"))


def check_printed_commands(made: dict, out: str) -> None:
    """The closing hints are printed as built, parse with their tool's own parser and name files that
    exist."""
    import click
    from mlflow.cli import cli

    commands = made["commands"]
    for argv in commands.values():
        assert shlex.join(argv) in out
        assert Path(argv[0]).is_file() or shutil.which(argv[0]), (
            f"{argv[0]} is not runnable from {Path.cwd()}"
        )

    ui = commands["mlflow_ui"]
    assert ui[1] == "ui"
    params = cli.get_command(click.Context(cli), "ui").make_context("ui", ui[2:]).params
    assert _sqlite_file(params["backend_store_uri"]).is_file() and params["port"] == 5000

    dashboard = commands["optuna_dashboard"]
    assert _sqlite_file(dashboard[1]).is_file() and dashboard[2:] == ["--port", "8080"]

    finetune = commands["finetune"]
    start = 3 if finetune[1] == "-m" else 1  # `python -m mococxr` when the console script is missing
    args = build_parser().parse_args(finetune[start:])
    assert args.command == "finetune" and args.init == f"models:/{made['names'].registered_model}@production"
    root, test_csv = vars(args)["data.root"], vars(args)["data.test_csv"]
    assert Path(root).is_dir() and (Path(root) / test_csv).is_file()
    assert args.experiment not in (
        made["spec"].experiment,
        made["grid_spec"].experiment,
    )  # cells stay one run
    if args.tracking_uri:
        assert _sqlite_file(args.tracking_uri).is_file()


@pytest.mark.slow
def test_quick_demo_logs_every_stage_and_reruns_idempotently(tmp_path, tracking_uri, capsys):
    made = run_demo(quick=True, workdir=tmp_path)
    out = capsys.readouterr().out
    client = MlflowClient()
    sweep_exp, finetune_exp = made["spec"].experiment, made["grid_spec"].experiment
    registered = made["names"].registered_model
    assert registered == "mococxr-resnet18-demo-quick"

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
    version = client.get_model_version_by_alias(registered, "production")
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
    folder = report_dir(reports[0].info.run_id)  # the current revision's folder
    files = {a.path.removeprefix(folder + "/") for a in client.list_artifacts(reports[0].info.run_id, folder)}
    nested = {a.path for d in files for a in client.list_artifacts(reports[0].info.run_id, f"{folder}/{d}")}
    assert (
        "report.md" in files
        and any(p.endswith(".png") for p in nested)
        and any(p.endswith(".tex") for p in nested)
    )
    assert "AUC difference, paired" in out
    check_printed_commands(made, out)

    assert made["report"].run_id == reports[0].info.run_id and made["report"].table in out

    # a second run reuses everything: no new pretraining or fine-tune run, and the report of the same runs
    # (built once among the workers, again only when its inputs change) is printed as it was
    again = run_demo(quick=True, workdir=tmp_path)
    assert (again["grid"].started, again["grid"].skipped) == (0, 16)
    assert again["study"].trials_run == []
    assert len(_runs(sweep_exp, "pretrain")) == made["spec"].n_trials
    assert len(_runs(finetune_exp, "finetune")) == 16
    assert again["report"] == made["report"] and made["report"].table in capsys.readouterr().out
    rebuilt = _runs(finetune_exp, "report")
    assert [r.info.run_id for r in rebuilt] == [reports[0].info.run_id]
    assert rebuilt[0].data.metrics["report/revision"] == 1


def test_demo_variants_own_disjoint_names():
    variants = [demo_names(quick=q, dataset=d) for q in (False, True) for d in ("phantom", "nih", "chexpert")]
    assert variants[0].registered_model == REGISTERED_MODEL  # the full demo keeps the name the README uses
    for field in ("study", "registered_model", "grid"):
        values = [getattr(names, field) for names in variants]
        assert len(set(values)) == len(values), f"two demo variants share a {field}: {values}"
    experiments = [e for names in variants for e in (names.sweep_experiment, names.finetune_experiment)]
    assert len(set(experiments)) == len(experiments), experiments


@pytest.mark.slow
def test_quick_full_quick_in_the_default_store_leave_every_report_green(tmp_path, monkeypatch, capsys):
    """`demo --quick`, then the full demo (at a tiny size, with its own names), then `--quick` again, in a
    fresh folder's default store: no variant moves another's alias or adds runs to its report cells."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MOCOCXR_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)

    quick = run_demo(quick=True, size=TINY, workdir=tmp_path)
    full = run_demo(size=TINY, workdir=tmp_path)
    again = run_demo(quick=True, size=TINY, workdir=tmp_path)
    out = capsys.readouterr().out
    assert all(made["report"].run_id for made in (quick, full, again))
    assert (again["grid"].started, again["study"].trials_run) == (0, [])
    assert quick["names"] == again["names"]
    q, f = dataclasses.asdict(quick["names"]), dataclasses.asdict(full["names"])
    assert not set(q.values()) & set(f.values()), (q, f)
    assert f["registered_model"] == REGISTERED_MODEL

    client = MlflowClient()
    for made in (quick, full):
        versions = client.search_model_versions(f"name = '{made['names'].registered_model}'")
        assert len(versions) == 1  # promoted once; the other variant never registered into it
    assert (
        client.get_model_version_by_alias(REGISTERED_MODEL, "production").tags["mococxr.run_id"]
        == full["study"].best_run_id
    )
    assert len(_runs(full["names"].finetune_experiment, "finetune")) == 2 * 2 * 2  # inits x protocols x draws
    assert not (tmp_path / "mlflow.db").exists()
    # run from this folder, the hints spell the default store as typed in the README
    assert again["commands"]["mlflow_ui"][3] == "sqlite:///mlruns/mlflow.db"
    assert again["commands"]["optuna_dashboard"][1] == "sqlite:///mlruns/optuna.db"
    assert "--tracking-uri" not in again["commands"]["finetune"]
    check_printed_commands(again, out)


def test_the_shipped_plan_loads_with_its_stages_and_sizes():
    plan = load_demo_plan()
    assert plan.stages == ("data", "pretrain", "grid", "report")
    quick = plan.sizes["quick"]
    assert (quick.fractions, quick.draws, quick.epochs) == ((0.1, 0.5, 1.0), (2, 1, 1), (3, 2, 1))
    names = demo_names(quick=True)
    data = plan.data_config("phantom", "data/phantom-quick")
    spec = plan.study_spec(names, quick, data)
    assert (spec.name, spec.budget.n_trials, spec.epochs) == (names.study, 2, 2)
    assert (spec.base.image_size, spec.base.data) == (48, data)
    grid = plan.grid_spec(names, quick, data)
    assert grid.inits["moco"] == f"models:/{names.registered_model}@production"
    assert list(grid.inits) in (["random", "moco"], ["random", "imagenet", "moco"])
    assert grid.heartbeat == spec.heartbeat
    assert len(grid.configs()) == len(grid.inits) * 2 * (2 + 1 + 1)  # x protocols x draws


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(extra=1), "unknown key(s) extra"),
        (lambda r: r.update(stages=["grid", "data"]), "stages="),
        (lambda r: r["sizes"]["quick"].update(n_images=0), "sizes.quick.n_images=0"),
        (lambda r: r["sizes"]["full"]["draws"].pop(0.1), "sizes.full.draws gives no count"),
        (lambda r: r["data"]["phantom"].update(val=2), "data.phantom"),
        (lambda r: r["study"]["search_space"].update(lrr=[1, 2]), "search_space.lrr"),
        (lambda r: r["grid"].update(protocols=["lin"]), "grid.protocols"),
        (lambda r: r["grid"]["protocol_overrides"]["linear"].update(lrr=1), "grid.protocol_overrides.linear"),
        (lambda r: r["grid"]["base"].update(batch_size="x"), "grid.base.batch_size"),
        (lambda r: r["report"].update(replicates=5), "report: unknown key(s) replicates"),
    ],
)
def test_plan_errors_name_the_key(change, message):
    raw = copy.deepcopy(load_yaml(PLAN))
    change(raw)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_demo_plan(raw, source="demo_plan.yaml")


@pytest.mark.slow
def test_two_quick_demos_started_together_in_one_folder_share_the_work(tmp_path):
    """Two `mococxr demo --quick` in one folder at once: both exit 0, every cell is run once (one worker
    runs it, the other waits for it or takes another), one study, one report run."""
    import os
    import subprocess
    import sys
    from collections import Counter

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOCOCXR_"))}
    cmd = [sys.executable, "-m", "mococxr", "demo", "--quick"]
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    names = demo_names(quick=True)
    finetune = client.get_experiment_by_name(names.finetune_experiment).experiment_id
    runs = client.search_runs([finetune], max_results=1000)
    kinds = Counter((r.data.tags.get("mococxr.kind"), r.info.status) for r in runs)
    assert kinds == {("finetune", "FINISHED"): 16, ("grid", "FINISHED"): 1, ("report", "FINISHED"): 1}, kinds
    hashes = Counter(
        r.data.tags["mococxr.config_hash"] for r in runs if r.data.tags["mococxr.kind"] == "finetune"
    )
    assert set(hashes.values()) == {1}
    sweep = client.get_experiment_by_name(names.sweep_experiment).experiment_id
    pretrain = [r for r in client.search_runs([sweep]) if r.data.tags.get("mococxr.kind") == "pretrain"]
    assert len(pretrain) == 2 and {r.info.status for r in pretrain} == {"FINISHED"}
    assert all("the whole demo took" in out for out in outs)
