"""Resume never destroys: damaged or missing resume states stop with one line and change nothing,
registered checkpoints survive reconcile and retention, and resume states live only while needed.

One finished two-epoch run (epoch 1 registered and in production) is shared by the damage tests; each
damages its newest resume state, checks that a resume leaves the store exactly as it was, and repairs
it. The last test resumes it from the intact epoch 1.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mococxr.cli import main
from mococxr.config import PretrainConfig, build
from mococxr.data.phantom import synthesize
from mococxr.errors import TrackingError
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import registry
from mococxr.train import checkpoints, inits
from mococxr.train.pretrain import StopTraining, pretrain

EXPERIMENT = "faults"
MODEL = "faults-encoder"
FLAGS = {
    "init": "random",
    "image_size": 32,
    "batch_size": 16,
    "epochs": 2,
    "moco_k": 32,
    "moco_m": 0.99,
    "lr": 1e-3,
    "scheduler": "constant",
    "workers": 0,
    "seed": 3,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MOCOCXR_ARTIFACT_ROOT", str(root / "artifacts"))
        synthesize(root / "phantom", 48, size=32, seed=1)
        yield root


def _cfg(store: Path, **overrides) -> PretrainConfig:
    return build(
        PretrainConfig,
        {**FLAGS, "data": {"root": str(store / "phantom")}, "experiment": EXPERIMENT, **overrides},
    )


@pytest.fixture(scope="module")
def finished(store):
    """A finished 2-epoch run that keeps its resume states; epoch 1 registered and in production."""
    result = pretrain(_cfg(store, resume_state="keep", run_name="faulty"), progress=False)
    version = registry.register(MODEL, run_id=result.run_id, epoch=1)
    registry.promote(MODEL, version, "production")
    return result.run_id


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _snapshot(run_id: str) -> dict:
    """Everything a resume could change: run, checkpoints, every artifact file, metrics, registry."""
    client = MlflowClient()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    root = _local(experiment.artifact_location)
    return {
        "status": (run.info.status, run.info.end_time),
        "tags": run.data.tags,
        "models": sorted(
            (m.model_id, str(m.status), m.name, tuple(sorted(m.tags.items())))
            for m in checkpoints.run_models(run_id)
        ),
        "files": {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        },
        "metrics": {
            k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k))
            for k in run.data.metrics
        },
        "versions": sorted(
            (v.version, v.source, tuple(sorted(v.tags.items())))
            for v in client.search_model_versions(f"name = '{MODEL}'")
        ),
        "production": client.get_model_version_by_alias(MODEL, "production").version,
    }


def _state_file(run_id: str, epoch: int, ext: str = "pt") -> Path:
    return (
        _local(MlflowClient().get_run(run_id).info.artifact_uri)
        / checkpoints.RESUME_DIR
        / f"epoch_{epoch:04d}.{ext}"
    )


class _Payload:
    """Pickles to a call that would create a file: it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _damage(how: str, pt: Path, sidecar: Path, marker: Path) -> None:
    if how == "truncated":
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
        return
    torch.save({"epoch": 2, "model": _Payload(marker)}, pt)
    if how == "code-with-matching-sidecar":  # whoever swapped the file fixed the sidecar too
        data = pt.read_bytes()
        sidecar.write_text(
            json.dumps(
                {"file": pt.name, "epoch": 2, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        )


@pytest.mark.parametrize("how", ["truncated", "code", "code-with-matching-sidecar"])
def test_a_damaged_resume_state_stops_and_changes_nothing(finished, how, tmp_path, capsys):
    pt, sidecar = _state_file(finished, 2), _state_file(finished, 2, "json")
    original = pt.read_bytes(), sidecar.read_bytes()
    marker = tmp_path / "code-ran"
    try:
        _damage(how, pt, sidecar, marker)
        before = _snapshot(finished)
        capsys.readouterr()
        assert main(["pretrain", "--resume", finished, "--epochs", "3"]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("mococxr: error: resume point resume/epoch_0002.pt of run " + finished)
        assert "nothing was changed" in lines[0]
        assert f"mococxr pretrain --resume {finished} --resume-from 1" in lines[0]
        assert ("damaged" in lines[0]) == (how != "code-with-matching-sidecar"), lines[0]
        assert _snapshot(finished) == before
        assert not marker.exists()
    finally:
        pt.write_bytes(original[0])
        sidecar.write_bytes(original[1])


def test_unknown_run_id_is_one_line(store, capsys):
    assert main(["pretrain", "--resume", "0123456789abcdef0123456789abcdef"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such MLflow run" in err[0] and "0123456789abcdef0123456789abcdef" in err[0]


def test_resume_from_the_intact_epoch_keeps_the_registered_version(finished, capsys):
    client = MlflowClient()
    registered = client.get_model_version_by_alias(MODEL, "production")
    names = {checkpoints.model_epoch(m): m.name for m in checkpoints.run_models(finished)}
    assert names == {1: "e01-faulty", 2: "e02-faulty"}  # the epoch first, then the run
    pt = _state_file(finished, 2)
    pt.write_bytes(pt.read_bytes()[:1000])
    assert main(["pretrain", "--resume", finished, "--resume-from", "1", "--epochs", "3"]) == 0, (
        capsys.readouterr()
    )
    assert client.get_run(finished).info.status == "FINISHED"
    models: dict[int, list] = {}
    for m in checkpoints.run_models(finished):
        models.setdefault(checkpoints.model_epoch(m), []).append(m)
    assert sorted(models) == [1, 2, 3] and all(
        len(v) == 1 and "READY" in str(v[0].status) for v in models.values()
    )
    # the production version still resolves to epoch 1's checkpoint
    assert client.get_model_version_by_alias(MODEL, "production").version == registered.version
    state, info = inits.load_checkpoint(f"models:/{MODEL}@production")
    assert info["epoch"] == 1 and models[1][0].model_id in registered.source
    kept = sorted(i.path for i in client.list_artifacts(finished, checkpoints.RESUME_DIR))
    assert kept == [f"resume/epoch_000{e}.{x}" for e in (2, 3) for x in ("json", "pt")]  # resume_state=keep
    assert checkpoints.load_resume_state(finished)["epoch"] == 3


# -- registered checkpoints, sidecars and fallback, without training -----------------------------------------
def _toy_run(epochs: int) -> tuple[str, dict[int, str]]:
    with mt.start_run("toys") as run:
        ids = {
            e: ma.log_state_dict_model(
                {"w": torch.full((2,), float(e))},
                name=f"toy-epoch{e:03d}",
                run_id=run.info.run_id,
                experiment_id=run.info.experiment_id,
                step=e,
                info={},
                model_tags=mt.tags(kind="pretrain"),
            )
            for e in range(1, epochs + 1)
        }
    return run.info.run_id, ids


def test_reconcile_and_retention_never_delete_a_registered_checkpoint(tracking_uri):
    run_id, ids = _toy_run(4)
    registry.register("toy-kept", model_id=ids[3])
    registry.register("toy-kept", model_id=ids[1])
    checkpoints.reconcile(run_id, 2, None)  # epochs 3 and 4 are after the resume point, and READY: kept
    assert {m.model_id for m in checkpoints.run_models(run_id)} == set(ids.values())
    checkpoints.apply_retention(run_id, "every:5", {1: {}, 2: {}})  # keeps only the latest, epoch 2
    # epochs 3 and 4 are not judged before they are trained again; epoch 1 is registered
    assert {m.model_id for m in checkpoints.run_models(run_id)} == {ids[1], ids[2], ids[3], ids[4]}
    assert "retention every:5" in MlflowClient().get_logged_model(ids[1]).tags[checkpoints.KEPT_TAG]
    # retraining epochs 3 and 4 replaces their checkpoints, except the registered one (tagged instead)
    with mt.start_run("toys", run_id=run_id) as run:
        for epoch in (3, 4):
            new = ma.log_state_dict_model(
                {"w": torch.zeros(2)},
                name=f"toy-epoch{epoch:03d}",
                run_id=run_id,
                experiment_id=run.info.experiment_id,
                step=epoch,
                info={},
                model_tags=mt.tags(kind="pretrain"),
            )
            checkpoints.supersede(run_id, epoch, new)
    left = {m.model_id: m for m in checkpoints.run_models(run_id)}
    assert ids[4] not in left and ids[3] in left and len(left) == 5
    assert "registered as toy-kept v1" in left[ids[3]].tags[checkpoints.KEPT_TAG]


def _fake_state(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "model": {"w": torch.zeros(3)},
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "history": "{}",
        "metrics": {"train/loss": 1.0},
    }


def test_sidecars_fallback_and_explicit_epoch(tracking_uri, capsys):
    run_id, _ = _toy_run(0)
    for epoch in (1, 2, 3):
        checkpoints.save_resume_state(run_id, epoch, _fake_state(epoch))
    files = checkpoints.resume_files(run_id)
    assert sorted(files) == [2, 3] and all(set(f) == {"pt", "json"} for f in files.values())
    sidecar = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="resume/epoch_0003.json")
        ).read_text()
    )
    assert set(sidecar) == {"file", "epoch", "size", "sha256"} and sidecar["epoch"] == 3
    assert checkpoints.load_resume_state(run_id)["epoch"] == 3
    assert checkpoints.load_resume_state(run_id, resume_from=2)["epoch"] == 2
    with pytest.raises(TrackingError, match="no resume point for epoch 1; it keeps 2, 3"):
        checkpoints.load_resume_state(run_id, resume_from=1)
    # a state without its sidecar is an interrupted write: the one before it is used, and a line says so
    _state_file(run_id, 3, "json").unlink()
    capsys.readouterr()
    assert checkpoints.load_resume_state(run_id)["epoch"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch_0003.pt" in err[0] and "resuming from epoch 2" in err[0]
    checkpoints.delete_resume_states(run_id)
    assert checkpoints.resume_files(run_id) == {}


# -- resume state storage ---------------------------------------------------------------------------------
def test_resume_state_lives_only_while_the_run_can_resume(store, capsys):
    done = pretrain(
        _cfg(store, epochs=1), progress=False
    )  # finished: its resume state goes, checkpoints stay
    assert checkpoints.resume_files(done.run_id) == {}
    assert [checkpoints.model_epoch(m) for m in checkpoints.run_models(done.run_id)] == [1]
    capsys.readouterr()
    assert main(["pretrain", "--resume", done.run_id, "--epochs", "2"]) == 2
    assert "keeps no resume point" in capsys.readouterr().err

    def prune(epoch, encoder, metrics):
        raise StopTraining()

    pruned = pretrain(_cfg(store), on_epoch_end=prune, progress=False)
    assert pruned.stopped_early and checkpoints.resume_files(pruned.run_id) == {}

    def fail(epoch, encoder, metrics):
        if epoch == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pretrain(_cfg(store, run_name="fails"), on_epoch_end=fail, progress=False)
    (failed,) = mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string="attributes.run_name = 'fails'", output_format="list"
    )
    assert failed.info.status == "FAILED" and sorted(checkpoints.resume_files(failed.info.run_id)) == [1]
    resumed = pretrain(None, resume=failed.info.run_id, progress=False)  # a failed run resumes, then lets go
    assert sorted(resumed.history) == [1, 2] and checkpoints.resume_files(failed.info.run_id) == {}
