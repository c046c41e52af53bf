"""Unit tests of the MLflow store/tag helpers and of checkpoint retention (no training)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import mlflow
import mlflow.data
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import ConfigError, TrackingError
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.train import checkpoints


# -- tags ---------------------------------------------------------------------------------------------
def test_tags_are_prefixed_strings_and_drop_none():
    out = mt.tags(kind="pretrain", backbone="resnet18", checkpoint_epoch=3, label_fraction=0.1, draw=None)
    assert out == {
        "mococxr.kind": "pretrain",
        "mococxr.backbone": "resnet18",
        "mococxr.checkpoint_epoch": "3",
        "mococxr.label_fraction": "0.1",
    }


def test_every_design_tag_is_known():
    design = [
        "kind",
        "backbone",
        "init",
        "protocol",
        "dataset",
        "task",
        "label_fraction",
        "draw",
        "pretrain_run_id",
        "checkpoint_epoch",
        "optuna_study",
        "optuna_trial",
        "manifest_sha256",
    ]
    assert [mt.tag(k) for k in design] == [f"mococxr.{k}" for k in design]


def test_unknown_tag_is_refused():
    with pytest.raises(ValueError, match="unknown mococxr tag 'epochs'"):
        mt.tags(epochs=3)


# -- the store ------------------------------------------------------------------------------------------
def test_default_store_is_sqlite_under_mlruns(tmp_path):
    assert mt.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"


def test_default_store_follows_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = mt.resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert mt.artifact_root(uri) == tmp_path.resolve() / "mlruns" / "artifacts"


def test_override_beats_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/a.db")
    assert mt.resolve_tracking_uri() == "sqlite:////tmp/a.db"
    assert mt.resolve_tracking_uri("http://localhost:5000") == "http://localhost:5000"
    assert mt.artifact_root("http://localhost:5000") is None


@pytest.mark.parametrize(
    "uri", ["mlruns", "./mlruns", "/tmp/x/mlruns", "file:///tmp/x/mlruns", "file:mlruns"]
)
def test_file_store_is_refused(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match="file store.*sqlite:///"):
        mt.resolve_tracking_uri()
    with pytest.raises(TrackingError):
        mt.open_store()


def test_embedded_store_runs_and_models(tmp_path, monkeypatch):
    """One store for all checks: creating a sqlite store costs seconds (schema migrations)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOCOCXR_ARTIFACT_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = mt.open_store().tracking_uri
    assert (tmp_path / "mlruns").is_dir()
    assert mlflow.get_tracking_uri() == uri
    exp_id = mt.ensure_experiment("unit/exp")
    location = MlflowClient().get_experiment(exp_id).artifact_location
    assert location == (tmp_path.resolve() / "mlruns" / "artifacts" / "unit_exp").as_uri()
    assert mt.ensure_experiment("unit/exp") == exp_id

    # a run that raises is FAILED, an interrupted one KILLED (visible as such, and resumable)
    with pytest.raises(RuntimeError), mt.start_run("unit/exp") as run:
        raise RuntimeError("boom")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), mt.start_run("unit/exp") as run:
        raise KeyboardInterrupt
    assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"

    # a state dict logged as a LoggedModel comes back equal, through weights_only loading
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7)}
    with mt.start_run("unit/exp") as run:
        model_id = ma.log_state_dict_model(
            state,
            name="toy",
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            step=4,
            info={"backbone": "toy"},
            model_tags=mt.tags(kind="pretrain"),
        )
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
    model = MlflowClient().get_logged_model(model_id)
    assert model.tags["mococxr.checkpoint_epoch"] == "4" and model.tags["mococxr.kind"] == "pretrain"
    assert "READY" in str(model.status) and model.source_run_id == run.info.run_id
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    assert local.resolve().is_relative_to(tmp_path.resolve() / "mlruns" / "artifacts")
    loaded = torch.load(local / ma.STATE_DICT_FILE, weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_runs_logging_the_same_new_dataset_together_all_link_to_it(tmp_path):
    """MLflow's check-then-insert of a dataset loses a race between two runs (CI: a two-worker study);
    ma.log_inputs retries the rolled-back transaction. Rounds of two threads behind a barrier, each with
    a new digest: without the retry most rounds fail (26 of 30 measured)."""
    mt.open_store(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = mt.ensure_experiment("unit/race")
    client = MlflowClient()
    frame = pd.DataFrame({"image_id": ["a", "b"]})
    for round_ in range(8):
        with warnings.catch_warnings():  # a local path reads as several kinds of source: any will do
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                frame, source=str(tmp_path), name="pretrain", digest=f"d{round_:031d}"
            )
        run_ids = [client.create_run(exp_id).info.run_id for _ in range(2)]
        barrier, errors = threading.Barrier(2), []

        def log(run_id: str, dataset=dataset, barrier=barrier, errors=errors) -> None:
            with mlflow.start_run(run_id=run_id):
                barrier.wait()
                try:
                    ma.log_inputs([dataset], contexts=["pretrain"])
                except Exception as exc:  # reported below, with the round
                    errors.append(exc)

        threads = [threading.Thread(target=log, args=(r,)) for r in run_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, f"round {round_}: {errors[0]}"
        for run_id in run_ids:
            [logged] = client.get_run(run_id).inputs.dataset_inputs
            assert logged.dataset.digest == dataset.digest


def test_only_the_dataset_race_is_retried(monkeypatch):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: inputs.input_uuid")

    monkeypatch.setattr(mlflow, "log_inputs", fail)
    with pytest.raises(MlflowException, match="inputs.input_uuid"):
        ma.log_inputs([object()], contexts=["train"])
    assert len(calls) == 1


# -- retention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keep", "expected"),
    [("all", ("all", 0, None)), ("every:5", ("every", 5, None)), ("best:3:val/auc", ("best", 3, "val/auc"))],
)
def test_parse_keep(keep, expected):
    assert checkpoints.parse_keep(keep) == expected


@pytest.mark.parametrize(
    "keep",
    ["", "some", "every", "every:0", "every:x", "every:2:3", "best:2", "best:0:loss", "best:x:loss", "ALL"],
)
def test_parse_keep_errors(keep):
    with pytest.raises(ConfigError, match="every:K.*best:K:metric"):
        checkpoints.parse_keep(keep)


HISTORY = {
    e: {"train/loss": 5.0 - 0.5 * e, "val/auc": auc}
    for e, auc in zip(range(1, 8), [0.60, 0.75, 0.70, 0.80, 0.65, 0.72, 0.50], strict=True)
}


def test_retained_all_and_every():
    assert checkpoints.retained("all", HISTORY) == set(range(1, 8))
    assert checkpoints.retained("every:3", HISTORY) == {3, 6, 7}  # the latest is always kept
    assert checkpoints.retained("every:1", HISTORY) == set(range(1, 8))
    assert checkpoints.retained("every:2", {1: {}, 2: {}}) == {2}
    assert checkpoints.retained("every:5", {}) == set()


def test_retained_best_keeps_the_top_k_and_the_latest():
    assert checkpoints.retained("best:2:val/auc", HISTORY) == {4, 2, 7}
    assert checkpoints.retained("best:1:val/auc", {1: {"val/auc": 0.7}, 2: {"val/auc": 0.7}}) == {1, 2}
    # epochs without the metric (before monitoring starts) are never "best"
    partial = {1: {"train/loss": 1.0}, 2: {"val/auc": 0.6}, 3: {"val/auc": 0.9}, 4: {"train/loss": 1.0}}
    assert checkpoints.retained("best:1:val/auc", partial) == {3, 4}


def test_retained_best_needs_a_logged_metric():
    with pytest.raises(ConfigError, match="'val/auc' is not logged"):
        checkpoints.retained("best:2:val/auc", {1: {"train/loss": 1.0}})


NAMES = ["plain", "a'b", 'a"b', "a\\b", "ends\\", "é✓ü/名", "it''s", "x\\'y", "50%_off"]


def test_every_filter_matches_exactly_its_own_value(tmp_path):
    """Quotes, backslashes and unicode in names are matched as themselves by every filter we build."""
    from mococxr.tracking import filters as flt

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    client = MlflowClient()
    exp = client.create_experiment("names")
    ids = {v: client.create_run(exp, tags={"mococxr.kind": v}, run_name=v).info.run_id for v in NAMES}
    for value, rid in ids.items():
        by_tag = client.search_runs([exp], flt.tags({"mococxr.kind": value}))
        assert [r.info.run_id for r in by_tag] == [rid], value
        by_name = client.search_runs([exp], flt.equal("attributes.run_name", value))
        assert [r.info.run_id for r in by_name] == [rid], value
    some = [ids["a'b"], ids["a\\b"]]
    found = client.search_runs([exp], flt.both(flt.one_of("attributes.run_id", some), flt.status("RUNNING")))
    assert sorted(r.info.run_id for r in found) == sorted(some)
    with pytest.raises(TrackingError, match="both a single and a double quote"):
        flt.literal("a'b\"c")
    with pytest.raises(ConfigError, match="both a single and a double quote"):
        mt.check_experiment_name("a'b\"c")


def test_a_parent_ends_where_its_last_child_ended(tmp_path):
    """A reopened parent is not stretched over the pause before its re-run: it spans its children."""
    import time

    from mococxr.tracking import runs

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    client = MlflowClient()
    exp = client.create_experiment("parents")
    parent = client.create_run(exp).info.run_id
    runs.end_parent(parent, "FINISHED")  # no child yet: ends now
    assert client.get_run(parent).info.status == "FINISHED"
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(child, "FINISHED")
    last = client.get_run(child).info.end_time
    runs.reopen(parent)
    time.sleep(1.2)  # the pause a re-run would add
    runs.end_parent(parent, "FINISHED")
    info = client.get_run(parent).info
    assert info.status == "FINISHED" and info.end_time == last
