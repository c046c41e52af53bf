"""Faults of the store itself: damaged sqlite pages, stale registry stages, versions whose LoggedModel was
deleted, experiment names that are path components or hold quotes, and stale end reasons of resumed runs.
Every user-facing failure is one line `mococxr: error: ...` naming the culprit, exit 2."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import mlflow
import pytest
import torch
from cli_errors import exit_code as _exit_code
from cli_errors import one_error as _one_error
from mlflow.tracking import MlflowClient

from mococxr.data.phantom import synthesize
from mococxr.errors import ConfigError, TrackingError, user_message
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import probe, registry
from mococxr.train import inits


@pytest.fixture(autouse=True)
def _own_store_cache(monkeypatch):
    """Each test opens its stores afresh (open_store remembers the stores this process opened)."""
    monkeypatch.setattr(mt, "_OPENED", {})
    monkeypatch.delenv(probe.CHECK_STORE_ENV, raising=False)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def few_runs(tmp_path_factory) -> Path:
    """A store holding three finished runs with params and metrics, made once for the module."""
    root = tmp_path_factory.mktemp("few-runs")
    db = root / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCOCXR_ARTIFACT_ROOT", str(root / "artifacts"))
        mt.open_store(f"sqlite:///{db}")
        for i in range(3):
            with mt.start_run("few", run_name=f"run-{i}", run_tags=mt.tags(kind="pretrain")):
                mlflow.log_params({"lr": 0.1 * (i + 1), "batch_size": 16})
                for step in range(5):
                    mlflow.log_metrics(
                        {"train/loss": 1.0 / (step + 1), "val/auc": 0.5 + 0.05 * step}, step=step
                    )
        mt._OPENED.clear()
        mlflow.set_tracking_uri(None)
    return db


@pytest.fixture()
def store(few_runs, tmp_path, monkeypatch) -> Path:
    """A copy of the few-runs store, opened through MLFLOW_TRACKING_URI, artifacts in the test's folder."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(few_runs, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    mt.open_store()
    return db


# -- registry: stages are aliases, and versions whose LoggedModel is gone ------------------------------------
def _checkpoints(experiment: str, n: int) -> list[str]:
    """``n`` LoggedModels (one per epoch) of one finished run."""
    ids = []
    with mt.start_run(experiment, run_tags=mt.tags(kind="pretrain", backbone="resnet18")) as run:
        for epoch in range(1, n + 1):
            ids.append(
                ma.log_state_dict_model(
                    {"w": torch.full((2,), float(epoch))},
                    name=f"toy-epoch{epoch:03d}",
                    run_id=run.info.run_id,
                    experiment_id=run.info.experiment_id,
                    step=epoch,
                    info={"backbone": "resnet18", "epoch": epoch},
                )
            )
    return ids


def _stages(name: str) -> dict[int, str]:
    table = registry.list_versions(name)
    return dict(zip(table["version"].tolist(), table["stage"].tolist(), strict=True))


def test_list_shows_where_the_alias_is_not_a_stale_tag(store):
    name = "stale-stage"
    v1, v2 = (registry.register(name, model_id=m) for m in _checkpoints("reg", 2))
    registry.promote(name, v1, "production")
    assert _stages(name) == {1: "production", 2: ""}
    MlflowClient().set_registered_model_alias(name, "production", v2)  # moved in the UI, not by mococxr
    assert _stages(name) == {1: "", 2: "production"}

    registry.promote(name, v1, "archived")  # archived has no alias: the tag says it ...
    assert _stages(name) == {1: "archived", 2: "production"}
    MlflowClient().set_registered_model_alias(name, "staging", v1)  # ... until an alias points there again
    assert _stages(name) == {1: "staging", 2: "production"}


def test_a_version_whose_logged_model_was_deleted_is_refused(store, capsys):
    name = "gone-model"
    kept, deleted = _checkpoints("reg", 2)
    v1 = registry.register(name, model_id=deleted)
    v2 = registry.register(name, model_id=kept)
    registry.promote(name, v1, "production")
    MlflowClient().delete_logged_model(deleted)

    for uri in (f"models:/{name}/{v1}", f"models:/{name}@production", f"models:/{name}/Production"):
        with pytest.raises(TrackingError) as caught:
            inits.resolve_init(uri, "resnet18")
        message = str(caught.value)
        assert "\n" not in message
        for part in (repr(name), f"version {v1}", deleted, "deleted", "another version", "register another"):
            assert part in message, (part, message)
    with pytest.raises(TrackingError, match=f"{name}.*version {v1}.*{deleted}.*deleted"):
        registry.promote(name, v1, "staging")

    capsys.readouterr()  # MLflow's "Created version" lines
    code = _exit_code(["registry", "promote", "--name", name, "--version", v1, "--stage", "production"])
    line = _one_error(capsys, code, name, deleted, "deleted")
    assert f"version {v1}" in line
    # the other version still resolves and promotes; the orphan can still be archived, to retire it
    assert torch.equal(inits.load_checkpoint(f"models:/{name}/{v2}")[0]["w"], torch.full((2,), 1.0))
    registry.promote(name, v2, "production")
    registry.promote(name, v1, "archived")
    assert _stages(name) == {1: "archived", 2: "production"}


# -- damaged sqlite pages ------------------------------------------------------------------------------------
def _quick_check(db: Path) -> list[str]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return [row[0] for row in con.execute("PRAGMA quick_check")]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return [str(exc)]


def _damaged_copy(source: Path, target: Path, seed: int = 2) -> Path:
    """``source`` copied to ``target`` with 8 KB of random bytes at 60-95 % of the file, and checked to land
    in pages the database uses (quick_check fails) while the header still reads as healthy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(source.read_bytes())
    rng = random.Random(seed)
    offset = rng.randint(int(len(data) * 0.60), int(len(data) * 0.95) - 8192)
    data[offset : offset + 8192] = rng.randbytes(8192)
    target.write_bytes(bytes(data))
    assert _quick_check(source) == ["ok"]
    assert _quick_check(target) != ["ok"], "the damage must land in used pages"
    probe.probe_sqlite(target)  # the header alone does not tell
    return target


def test_damaged_pages_are_found_at_open(few_runs, tmp_path):
    bad = _damaged_copy(few_runs, tmp_path / "bad" / "mlflow.db")
    with pytest.raises(TrackingError) as caught:
        mt.open_store(f"sqlite:///{bad}")
    message = str(caught.value)
    assert "\n" not in message and f"MLflow store {bad} is damaged" in message and "backup" in message


@pytest.mark.parametrize("seed", [0, 2])  # without the check, MLflow fails on 0 itself but writes on into 2
def test_damaged_store_named_when_chosen_by_the_environment(seed, few_runs, tmp_path, monkeypatch, capsys):
    bad = _damaged_copy(few_runs, tmp_path / "env" / "mlflow.db", seed)
    before = bad.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bad}")
    _one_error(capsys, _exit_code(["registry", "list"]), f"MLflow store {bad}", "damaged", "backup")
    assert bad.read_bytes() == before  # read only: nothing written into the damaged store


def test_damaged_store_named_when_chosen_by_the_flag(few_runs, tmp_path, capsys):
    bad = _damaged_copy(few_runs, tmp_path / "flag" / "mlflow.db")
    code = _exit_code(["--tracking-uri", f"sqlite:///{bad}", "registry", "list"])
    _one_error(capsys, code, f"MLflow store {bad}", "damaged")


def test_damage_found_later_by_mlflow_names_the_file(few_runs, tmp_path, monkeypatch, capsys):
    """With the check off, MLflow (SQLAlchemy) meets the damage itself; the line still names the file."""
    data = bytearray(few_runs.read_bytes())
    data[100:4096] = random.Random(1).randbytes(4096 - 100)  # the schema page, behind an intact header
    bad = tmp_path / "later" / "mlflow.db"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    monkeypatch.setenv(probe.CHECK_STORE_ENV, "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bad}")
    line = _one_error(capsys, _exit_code(["registry", "list"]), f"MLflow store {bad} is damaged", "backup")
    assert "malformed" in line or "not a database" in line


def test_a_run_whose_logging_meets_damage_names_the_store():
    """A TrackingError that only wraps the database's complaint becomes the damaged-store line."""
    try:
        try:
            raise sqlite3.DatabaseError("database disk image is malformed")
        except sqlite3.DatabaseError as exc:
            raise TrackingError(
                f"run abc (experiment 'x') is incomplete and marked FAILED: logging failed: {exc}"
            ) from exc
    except TrackingError as exc:
        message = user_message(exc, None)
        assert message is not None and "malformed" in message
        assert user_message(exc, "sqlite:////data/mlruns/mlflow.db").startswith(
            "MLflow store /data/mlruns/mlflow.db is damaged (database disk image is malformed); restore"
        )


def test_a_healthy_store_is_checked_and_opens(few_runs, tmp_path, monkeypatch):
    good = tmp_path / "good" / "mlflow.db"
    good.parent.mkdir()
    shutil.copyfile(few_runs, good)
    checked = []
    monkeypatch.setattr(mt, "check_sqlite", lambda db: (checked.append(db), probe.check_sqlite(db)))
    assert mt.open_store(f"sqlite:///{good}").tracking_uri == f"sqlite:///{good}"
    assert checked == [good]
    (run,) = mlflow.search_runs(
        experiment_names=["few"], filter_string="attributes.run_name = 'run-0'", output_format="list"
    )
    assert run.data.params["batch_size"] == "16"


def test_check_store_0_skips_and_1_forces(few_runs, tmp_path, monkeypatch):
    bad = _damaged_copy(few_runs, tmp_path / "skip" / "mlflow.db")  # seed 2: MLflow itself does not notice
    monkeypatch.setenv(probe.CHECK_STORE_ENV, "0")
    mt.open_store(f"sqlite:///{bad}")  # the user asked for no check

    big = _damaged_copy(few_runs, tmp_path / "big" / "mlflow.db")
    monkeypatch.delenv(probe.CHECK_STORE_ENV)
    monkeypatch.setattr(probe, "CHECK_STORE_MAX_BYTES", big.stat().st_size - 1)  # "large": not checked
    assert not probe.store_check_wanted(big)
    mt.open_store(f"sqlite:///{big}")
    mt._OPENED.clear()
    monkeypatch.setenv(probe.CHECK_STORE_ENV, "1")  # checked whatever its size when asked
    with pytest.raises(TrackingError, match="is damaged"):
        mt.open_store(f"sqlite:///{big}")

    assert not probe.store_check_wanted(tmp_path / "new" / "mlflow.db")  # a new store: nothing to check
    monkeypatch.setenv(probe.CHECK_STORE_ENV, "yes")
    with pytest.raises(TrackingError, match=f"{probe.CHECK_STORE_ENV}='yes'"):
        probe.store_check_wanted(big)


# -- experiment names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "", "   ", " .. ", "a\x00b"])
def test_experiment_names_that_are_path_components_are_refused(name, store):
    with pytest.raises(ConfigError) as caught:
        mt.ensure_experiment(name)
    assert repr(name) in str(caught.value) and "--experiment" in str(caught.value)
    assert MlflowClient().get_experiment_by_name(name) is None


def test_experiment_dot_dot_on_the_command_line_writes_nothing(store, tmp_path, monkeypatch, capsys):
    phantom = synthesize(tmp_path / "ph", 16, size=32, seed=0)
    before = sorted(p.name for p in store.parent.iterdir())
    code = _exit_code(
        [
            "pretrain",
            "--experiment",
            "..",
            "--root",
            str(phantom),
            "--init",
            "random",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--moco-k",
            "16",
            "--workers",
            "0",
        ]
    )
    _one_error(capsys, code, "'..'", "--experiment")
    assert sorted(p.name for p in store.parent.iterdir()) == before
    assert {p.name for p in tmp_path.iterdir()} <= {
        "ph",
        "store",
        "artifacts",
    }  # nothing beside the artifacts
    assert MlflowClient().get_experiment_by_name("..") is None


@pytest.mark.parametrize("name", ["bad'name", 'bad"name', "both'\"kinds"])
def test_names_with_quotes_reach_the_registry(name, store):
    if "'" in name and '"' in name:  # no search filter can match it: refused before anything is made
        with pytest.raises(ConfigError, match="both a single and a double quote"):
            mt.ensure_experiment(name)
        with pytest.raises(TrackingError, match="both a single and a double quote"):
            registry.consumers_filter(name, 1)
        return
    exp_id = mt.ensure_experiment(name)
    assert MlflowClient().get_experiment(exp_id).name == name
    (model_id,) = _checkpoints(name, 1)
    version = registry.register(name, model_id=model_id)
    registry.promote(name, version, "production")
    assert _stages(name) == {1: "production"}
    assert registry.version_info(f"models:/{name}@production")["registry_version"] == "1"
    with mt.start_run(f"ft-{name}", run_tags=mt.tags(kind="finetune", registry_version=version)):
        mlflow.log_params({"init_registered_model": name, "init_registry_version": version})
    assert registry.count_consumers(name, version) == 1


# -- resumed runs --------------------------------------------------------------------------------------------
def test_a_resumed_run_that_finishes_drops_its_old_end_reason(store):
    client = MlflowClient()
    with pytest.raises(KeyboardInterrupt), mt.start_run("resume") as run:
        raise KeyboardInterrupt
    run_id = run.info.run_id
    assert client.get_run(run_id).data.tags[mt.tag("end_reason")].startswith("interrupted")

    with pytest.raises(RuntimeError), mt.start_run("resume", run_id=run_id):
        raise RuntimeError("disk hiccup")
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED" and "disk hiccup" in failed.data.tags[mt.tag("end_reason")]

    with mt.start_run("resume", run_id=run_id):
        mlflow.log_metric("train/loss", 0.5, step=2)
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and mt.tag("end_reason") not in finished.data.tags

    with mt.start_run("resume", run_id=run_id):  # resuming a run without a reason is fine too
        pass
    assert client.get_run(run_id).info.status == "FINISHED"
