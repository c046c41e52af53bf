"""Optuna studies over pretraining: spec validation, MLflow linkage, shared budgets, dead workers, promotion.

The study tests train ResNet18 at 32 px on a 64-image phantom for 1-2 epochs per trial, so every trial
takes seconds; the worker tests run real ``run_sweep`` processes against one sqlite (or PostgreSQL)
study and kill one with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mococxr.errors import ConfigError
from mococxr.sweep.study import _open_study, load_spec, make_storage, parse_spec, run_study
from mococxr.tracking import mlflow as mt

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "test-sweep"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from mococxr.data.phantom import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "ph", 64, size=64)


def spec_dict(root: Path, storage: str, **over) -> dict:
    data = {
        "name": "t",
        "storage": storage,
        "experiment": EXPERIMENT,
        "budget": {"n_trials": 4, "epochs": 2},
        "search_space": {
            "lr": {"type": "float", "low": "1.0e-3", "high": "5.0e-2", "log": True},
            "scheduler": ["cosine", "milestone"],
        },
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": {"name": "median", "n_startup_trials": 1},
        "heartbeat": {"interval": 1, "grace_period": 3, "max_retry": 2},
        "base": {
            "data": {"dataset": "chexpert", "root": str(root), "val": 0.25, "test": 0.2},
            "init": "random",
            "image_size": 32,
            "batch_size": 16,
            "moco_k": 64,
            "workers": 0,
        },
    }
    data.update(over)
    return data


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def child_runs(parent_id: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def load_study(spec) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=make_storage(spec))


def check_linkage(study: optuna.Study, parent_id: str) -> None:
    """One MLflow child run per trial that trained, tags and user attributes agreeing both ways."""
    runs = {r.info.run_id: r for r in child_runs(parent_id)}
    trained = [t for t in study.get_trials() if t.user_attrs.get("mlflow_run_id")]
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trained) == sorted(runs)
    for t in trained:
        tags = runs[t.user_attrs["mlflow_run_id"]].data.tags
        assert tags["mococxr.optuna_study"] == study.study_name
        assert tags["mococxr.optuna_trial"] == str(t.number)
        assert tags["mococxr.optuna_state"] == t.state.name
        assert tags["mococxr.kind"] == "pretrain"


def worker(spec_path: Path, log: Path) -> subprocess.Popen:
    code = "import sys; from mococxr.sweep.study import run_sweep; run_sweep(sys.argv[1])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(spec_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec_path.parent,
        )


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    for proc, log in zip(procs, logs, strict=True):
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"worker timed out:\n{log.read_text()[-3000:]}") from None
        assert rc == 0, log.read_text()[-3000:]


def prepare_stores(spec) -> None:
    """Create the MLflow and optuna tables once, as a first `mococxr sweep` would."""
    mt.open_store()
    mt.ensure_experiment(EXPERIMENT)
    optuna.create_study(
        study_name=spec.name, storage=make_storage(spec), load_if_exists=True, direction=spec.direction
    )


# -- the spec ------------------------------------------------------------------------------------------
def test_shipped_specs_load():
    paper = load_spec(REPO / "sweeps" / "pretrain_lr.yaml")
    assert paper.search_space["lr"].choices == (1e-2, 1e-3, 1e-4, 1e-5)
    assert paper.search_space["scheduler"].choices == ("cosine", "milestone")
    assert (paper.base.backbone, paper.base.image_size, paper.base.batch_size) == ("resnet18", 224, 16)
    assert paper.base.monitor and paper.base.epochs == paper.epochs
    assert paper.base.keep == "best:1:val/linear_auc"
    from mococxr.flows.demo import demo_names, load_demo_plan

    plan = load_demo_plan()  # the demo's study is a section of its plan (mococxr/specs/demo_plan.yaml)
    size = plan.sizes["full"]
    demo = plan.study_spec(demo_names(), size, plan.data_config("phantom", REPO / "data"))
    lr = demo.search_space["lr"]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 3e-3, True)
    assert (demo.base.optimizer, demo.base.keep) == ("adam", "all")
    assert demo.storage is None  # the default: optuna.db beside the MLflow store


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget": {"n_trials": 0}}, "budget.n_trials"),
        ({"budget": {"n_trials": 2, "epoch": 3}}, "budget: unknown key(s) epoch"),
        ({"search_space": {"lrr": [1, 2]}}, "search_space.lrr: not a pretraining config key"),
        ({"search_space": {"epochs": [1, 2]}}, "search_space.epochs"),
        (
            {"search_space": {"lr": {"low": 1e-5, "high": 1e-2, "log": True, "type": "float", "x": 1}}},
            "search_space.lr: unknown key(s) x",
        ),
        ({"search_space": {"lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}}}, "low > 0"),
        ({"search_space": {"lr": ["fast"]}}, "search_space.lr.choices='fast': expected a number"),
        ({"search_space": {"scheduler": ["cosine", "linear-ish"]}}, "search_space.scheduler"),
        ({"search_space": {"moco_k": [64, 100]}}, "moco_k=100 is not a multiple of batch_size=16"),
        ({"sampler": {"name": "cmaes"}}, "sampler.name"),
        ({"sampler": {"name": "grid"}}, "search_space.lr: the grid sampler needs `choices`"),
        ({"pruner": {"name": "median", "min_resource": 1}}, "pruner: unknown key(s) min_resource"),
        ({"objective": {"metric": "train/loss"}}, "objective.metric"),
        ({"heartbeat": {"interval": 5, "grace_period": 5}}, "heartbeat.grace_period"),
        ({"base": {"keep": "every:5"}}, "base.keep"),
        ({"base": {"lr_typo": 1}}, "base: unknown key(s) lr_typo"),
        ({"name": "a'b\"c"}, "name="),
    ],
)
def test_spec_errors_name_the_key(tmp_path, change, message):
    data = spec_dict(tmp_path, "sqlite:///x.db")
    data.update(change)
    with pytest.raises(ConfigError) as err:
        parse_spec(data, source="s.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("s.yaml")


def test_parent_run_is_made_once_per_study_by_its_creator(tmp_path, tracking_uri):
    spec = parse_spec(spec_dict(tmp_path, f"sqlite:///{tmp_path / 'o.db'}"))
    mt.open_store()
    said: list[str] = []
    study, first = _open_study(spec, said.append)
    assert _open_study(spec, said.append)[1] == first  # a second worker joins: same parent, no waiting
    assert study.user_attrs["ready"] is True and not said
    assert study.metric_names == [spec.metric] == ["val/linear_auc"]  # optuna-dashboard's objective name
    other, second = _open_study(dataclasses.replace(spec, name="b"), said.append)
    assert second != first
    run = MlflowClient().get_run(first)
    assert run.data.tags["mococxr.kind"] == "sweep" and run.data.tags["mococxr.optuna_study"] == spec.name
    assert run.data.params["search.lr"] == "float[0.001, 0.05] log"


def test_interrupted_sweep_ends_its_parent_killed_with_a_description(tmp_path, tracking_uri, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into it) with no other worker alive: the parent is KILLED."""
    from mococxr.sweep import study as study_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "_work", interrupted)
    spec = parse_spec(spec_dict(tmp_path, f"sqlite:///{tmp_path / 'o.db'}"), source="s.yaml")
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, log=lambda line: None)
    [parent] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id])
    assert parent.info.status == "KILLED"
    note = parent.data.tags["mlflow.note.content"]
    assert "Optuna study **t**" in note and "0 complete" in note and "mococxr sweep s.yaml" in note
    assert parent.data.metrics["sweep/n_complete"] == 0


# -- studies -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_study_links_runs_and_promotes_best(tmp_path, tracking_uri, phantom):
    from mococxr.train import inits

    spec = parse_spec(spec_dict(phantom, f"sqlite:///{tmp_path / 'optuna.db'}"))
    lines: list[str] = []
    result = run_study(spec, promote="staging", log=lines.append)

    study = load_study(spec)
    trials = study.get_trials()
    assert len(trials) == 4 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert result.n_complete + result.n_pruned == 4 and result.trials_run == [0, 1, 2, 3]
    assert sum(line.startswith("trial ") for line in lines) == 4
    check_linkage(study, result.parent_run_id)
    assert study.user_attrs["mlflow_parent_run_id"] == result.parent_run_id

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert (result.best_trial, result.best_value) == (best.number, best.value)
    history = MlflowClient().get_metric_history(best.user_attrs["mlflow_run_id"], "val/linear_auc")
    assert best.value == max(m.value for m in history)
    assert best.user_attrs["best_epoch"] == max(history, key=lambda m: (m.value, -m.step)).step
    parent = MlflowClient().get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mococxr.pretrain_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.tags["mococxr.checkpoint_epoch"] == str(best.user_attrs["best_epoch"])
    assert parent.data.tags["mococxr.optuna_trial"] == str(best.number)
    assert parent.data.metrics["val/linear_auc"] == pytest.approx(best.value)

    assert result.promoted_uri == "models:/mococxr-resnet18@staging"
    promoted, info = inits.load_checkpoint(result.promoted_uri)
    logged, _ = inits.load_checkpoint(f"models:/{best.user_attrs['best_model_id']}")
    assert info["run_id"] == best.user_attrs["mlflow_run_id"]
    assert str(info["epoch"]) == str(best.user_attrs["best_epoch"])
    assert promoted.keys() == logged.keys()
    assert all(torch.equal(promoted[k], logged[k]) for k in logged)
    # A second worker finding the study done promotes nothing new and runs nothing.
    again = run_study(spec, promote="staging", log=lines.append)
    assert again.trials_run == [] and again.registered_version == result.registered_version


@pytest.mark.slow  # ~25 s: two trials of two epochs
def test_study_prints_every_trials_epochs(tmp_path, tracking_uri, phantom, capfd, monkeypatch):
    """The study is never silent for a trial's length: each trial prints its epoch lines and, in a log
    (not a terminal), its batches' progress lines, as a single ``mococxr pretrain`` does, named by the
    trial; MLflow's INFO lines stay off the terminal."""
    from mococxr import console
    from mococxr.train import pretrain_epoch

    # a progress line per batch rather than per 10 s, so these fast batches show whether progress is on
    monkeypatch.setattr(pretrain_epoch, "progress_bar", functools.partial(console.progress, every_s=0))
    budget = {"n_trials": 2, "epochs": 2}
    spec = parse_spec(
        spec_dict(phantom, f"sqlite:///{tmp_path / 'o.db'}", budget=budget, pruner={"name": "none"})
    )
    result = run_study(spec)
    out, err = capfd.readouterr()
    assert result.trials_run == [0, 1]
    for trial in result.trials_run:
        for epoch in (1, 2):
            line = next(
                x for x in out.splitlines() if x.startswith(f"[t-trial{trial:03d}] epoch {epoch}/2  ")
            )
            assert "loss" in line and "val/linear_auc" in line
            assert f"[t-trial{trial:03d}] pretrain epoch {epoch}/2: 1/" in err  # its first batch
    assert sum(x.startswith("trial ") for x in out.splitlines()) == 2  # the study's own line per trial
    assert "INFO mlflow" not in out + err and "Creating initial MLflow" not in out + err


@pytest.mark.slow
def test_study_reads_the_label_csv_once(tmp_path, tracking_uri, phantom, monkeypatch):
    """Every trial of a worker shares one prepared dataset: three trials parse the label CSV once."""
    import mococxr.data.prepare  # noqa: F401  (the reader it imported must be counted too)
    from mococxr.data import records

    original = records.read_records
    calls: list[tuple] = []

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("mococxr")]:
        if getattr(module, "read_records", None) is original:  # every module that imported the reader
            monkeypatch.setattr(module, "read_records", counting)
    spec = parse_spec(
        spec_dict(
            phantom,
            f"sqlite:///{tmp_path / 'optuna.db'}",
            budget={"n_trials": 3, "epochs": 1},
            pruner={"name": "none"},
        )
    )
    result = run_study(spec, log=lambda line: None)
    assert result.trials_run == [0, 1, 2] and result.n_complete == 3
    assert len(calls) == 1, calls


@pytest.mark.slow
def test_pruned_trials_stop_early_and_are_tagged(tmp_path, tracking_uri, phantom):
    spec = parse_spec(
        spec_dict(phantom, f"sqlite:///{tmp_path / 'optuna.db'}", budget={"n_trials": 3, "epochs": 2})
    )
    prepare_stores(spec)
    study = load_study(spec)
    # A reference trial no phantom encoder can beat at epoch 1: the median pruner must stop the others there.
    distributions = {
        "lr": optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True),
        "scheduler": optuna.distributions.CategoricalDistribution(["cosine", "milestone"]),
    }
    study.add_trial(
        optuna.create_trial(
            params={"lr": 1e-2, "scheduler": "cosine"},
            distributions=distributions,
            value=1.0,
            intermediate_values={1: 1.0, 2: 1.0},
            user_attrs={"reference": True},
        )
    )
    result = run_study(spec, log=lambda line: None)
    real = [t for t in load_study(spec).get_trials() if "reference" not in t.user_attrs]
    assert [t.state for t in real] == [TrialState.PRUNED, TrialState.PRUNED]
    for t in real:
        run = MlflowClient().get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mococxr.optuna_state"] == "PRUNED" and run.info.status == "FINISHED"
        steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val/linear_auc")]
        assert steps == [1] and list(t.intermediate_values) == [1]
    assert result.best_trial == 0  # the reference, the only COMPLETE trial


# -- workers -------------------------------------------------------------------------------------------
def run_two_workers(tmp_path: Path, phantom: Path, storage: str, n_trials: int) -> None:
    """Two `run_sweep` processes on one study: exactly ``n_trials`` finish, none twice."""
    data = spec_dict(phantom, storage, budget={"n_trials": n_trials, "epochs": 1}, pruner={"name": "none"})
    spec_path = write_spec(tmp_path / "spec.yaml", data)
    spec = load_spec(spec_path)
    prepare_stores(spec)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    procs = [worker(spec_path, log) for log in logs]
    wait_all(procs, logs, timeout=600)

    study = load_study(spec)
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    others = [t for t in study.get_trials() if t not in finished]
    assert all(t.user_attrs.get("fail_reason", "").startswith("over budget") for t in others)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    check_linkage(study, parent_id)
    assert len(child_runs(parent_id)) == n_trials
    assert {t.user_attrs["worker"].split(":")[1] for t in finished} <= {str(p.pid) for p in procs}
    text = "".join(log.read_text() for log in logs)
    assert sum(line.startswith("trial ") for line in text.splitlines()) == len(study.get_trials()), text


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path, tracking_uri, phantom):
    run_two_workers(tmp_path, phantom, f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=4)


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(tmp_path, tracking_uri, phantom):
    data = spec_dict(
        phantom,
        f"sqlite:///{tmp_path / 'optuna.db'}",
        budget={"n_trials": 3, "epochs": 2},
        pruner={"name": "none"},
    )
    spec_path = write_spec(tmp_path / "spec.yaml", data)
    spec = load_spec(spec_path)
    prepare_stores(spec)
    proc = worker(spec_path, tmp_path / "killed.log")
    study = load_study(spec)
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        # Kill after the first trial finished, once the second has logged its first epoch.
        running = [
            t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs
        ]
        if running and running[0].number >= 1:
            victim = running[0]
    assert victim is not None, (tmp_path / "killed.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {
        t.number: t.user_attrs["mlflow_run_id"] for t in study.get_trials(states=(TrialState.COMPLETE,))
    }
    assert done_before

    lines: list[str] = []
    result = run_study(spec, log=lines.append)  # the restarted command
    trials = load_study(spec).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state == TrialState.COMPLETE and retries[0].number in result.trials_run
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    for number, run_id in done_before.items():  # nothing finished was run again
        assert by_number[number].user_attrs["mlflow_run_id"] == run_id
        assert number not in result.trials_run
    dead = MlflowClient().get_run(victim.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and dead.data.tags["mococxr.optuna_state"] == "FAIL"
    check_linkage(load_study(spec), result.parent_run_id)
    assert any(f"(retry of trial {victim.number})" in line for line in lines)


# -- PostgreSQL ----------------------------------------------------------------------------------------
@pytest.fixture()
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1, stopped and deleted afterwards (tests/servers.py)."""
    from servers import postgres

    with postgres() as pg:
        pg.create_database("optuna")
        yield pg.url("optuna", password=pg.password)


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path, tracking_uri, phantom, postgres_url):
    run_two_workers(tmp_path, phantom, postgres_url, n_trials=3)
