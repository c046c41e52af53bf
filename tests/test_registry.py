"""Registry round trip: register a run's epoch, promote it, and resolve every URI spelling to its weights.

The run is a stand-in (three epochs of random state dicts logged as the pretraining loop logs them), so
these tests need no training; tests/test_pretrain.py covers the loop itself.
"""

from __future__ import annotations

import mlflow
import pytest
import torch

from mococxr import cli
from mococxr.errors import DataError, TrackingError
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import registry
from mococxr.train import inits


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating one costs seconds (schema migrations)."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MOCOCXR_ARTIFACT_ROOT", str(root / "artifacts"))
        mt.open_store()
        yield root


@pytest.fixture()
def name(request) -> str:
    """A registered model name of the test's own: the store is shared by the module."""
    return f"mococxr-{request.node.name}"


@pytest.fixture()
def run(store):
    """A finished run with one LoggedModel (and linked metrics) per epoch; returns (run id, states)."""
    mt.open_store()
    states = {}
    with mt.start_run(
        "registry",
        run_tags=mt.tags(kind="pretrain", backbone="resnet18", dataset="chexpert", manifest_sha256="ab" * 32),
    ) as active:
        info = active.info
        for epoch in (1, 2, 3):
            states[epoch] = {
                "trunk.w": torch.randn(4, 3),
                "trunk.bn.num_batches_tracked": torch.tensor(epoch),
            }
            model_id = ma.log_state_dict_model(
                states[epoch],
                name=f"toy-epoch{epoch:03d}",
                run_id=info.run_id,
                experiment_id=info.experiment_id,
                step=epoch,
                info={"backbone": "resnet18", "epoch": epoch},
            )
            mlflow.log_metrics({"train/loss": 4.0 - epoch}, step=epoch, model_id=model_id)
    return info.run_id, states


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_register_promote_resolve_round_trip(name, run):
    run_id, states = run
    v1 = registry.register(name, run_id=run_id, epoch=2)
    registry.promote(name, v1, "production")
    for uri in (f"models:/{name}/Production", f"models:/{name}@production", f"models:/{name}/1"):
        state, info = inits.load_checkpoint(uri)
        assert _equal(state, states[2]), uri
        assert info["run_id"] == run_id and info["epoch"] == 2 and info["registry_version"] == "1", uri
    table = registry.list_versions(name)
    row = table.iloc[0].to_dict()
    assert (row["version"], row["stage"], row["run_id"], row["epoch"]) == (1, "production", run_id, "2")
    assert float(row["train/loss"]) == 2.0  # the epoch's metrics travel with the version

    # a new production version takes the alias; the old one is left without a stage, then archived
    v2 = registry.register(name, run_id=run_id, epoch=3)
    registry.promote(name, v2, "production")
    assert _equal(inits.load_checkpoint(f"models:/{name}@production")[0], states[3])
    assert _equal(inits.load_checkpoint(f"models:/{name}/1")[0], states[2])
    stages = dict(zip(*registry.list_versions(name)[["version", "stage"]].T.values, strict=True))
    assert stages == {1: "", 2: "production"}
    registry.promote(name, v1, "staging")
    registry.promote(name, v1, "archived")
    stages = dict(zip(*registry.list_versions(name)[["version", "stage"]].T.values, strict=True))
    assert stages == {1: "archived", 2: "production"}
    with pytest.raises(TrackingError):
        inits.load_checkpoint(f"models:/{name}@staging")


def test_unknown_references_are_tracking_errors(name, run):
    registry.register(name, run_id=run[0], epoch=1)
    for uri, message in [
        ("models:/nothing@production", "cannot resolve"),
        ("models:/nothing/Production", "cannot resolve"),
        ("models:/nothing/3", "cannot resolve"),
        (f"models:/{name}/7", "cannot resolve"),
        (f"models:/{name}@production", "cannot resolve"),
        (f"models:/{name}/Shipping", "unknown stage"),
        ("runs:/0123456789abcdef/state_dict.pt", "cannot resolve"),
    ]:
        with pytest.raises(TrackingError, match=message):
            inits.load_checkpoint(uri)
    with pytest.raises(DataError, match="does not exist"):  # a bad file is a DataError, from the one loader
        inits.load_checkpoint("/no/such/checkpoint.pt")


def test_register_and_promote_errors(name, run):
    run_id, _ = run
    with pytest.raises(TrackingError, match="no checkpoint for epoch 9"):
        registry.register(name, run_id=run_id, epoch=9)
    with pytest.raises(TrackingError, match="no MLflow run"):
        registry.register(name, run_id="0" * 32, epoch=1)
    with pytest.raises(TrackingError, match="needs a model id"):
        registry.register(name, run_id=run_id)
    version = registry.register(name, run_id=run_id, epoch=1)
    with pytest.raises(TrackingError, match="unknown stage 'live'"):
        registry.promote(name, version, "live")
    with pytest.raises(TrackingError, match="has no version 5"):
        registry.promote(name, 5, "production")
    with pytest.raises(TrackingError, match="no registered model named 'other'"):
        registry.list_versions("other")


def test_resolve_a_run_artifact_and_a_local_file(run, tmp_path):
    run_id, states = run
    with mlflow.start_run(run_id=run_id):
        path = tmp_path / "weights.pt"
        torch.save(states[1], path)
        mlflow.log_artifact(str(path), "extra")
    assert _equal(inits.load_checkpoint(f"runs:/{run_id}/extra/weights.pt")[0], states[1])
    assert _equal(inits.load_checkpoint(str(path))[0], states[1])
    kind, state, origin = inits.resolve_init(f"runs:/{run_id}/extra/weights.pt", "resnet18")
    assert kind == "checkpoint" and _equal(state, states[1]) and origin["run_id"] == run_id
    assert inits.resolve_init("random", "resnet18") == ("random", None, {})
    pickled = tmp_path / "object.pt"
    torch.save({"w": torch.nn.Linear(1, 1)}, pickled)  # a pickled module, not a plain state dict
    with pytest.raises(DataError, match="plain state dict|pickled Python objects"):
        inits.load_checkpoint(str(pickled))


def test_cli_registry(name, run, capsys):
    run_id, _ = run
    assert cli.main(["registry", "list"]) == 0  # every model in the store, one line per version
    capsys.readouterr()
    assert (
        cli.main(
            ["registry", "register", "--name", name, "--run-id", run_id, "--epoch", "2", "--stage", "staging"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"registered {name} version 1" in out and f"models:/{name}@staging" in out
    assert cli.main(["registry", "promote", "--name", name, "--version", "1", "--stage", "Production"]) == 0
    assert f"models:/{name}@production" in capsys.readouterr().out
    assert cli.main(["registry", "list", "--name", name]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:5] == ["name", "version", "stage", "run_id", "epoch"]
    assert listing[1].split()[:5] == [name, "1", "production", run_id, "2"]

    # user errors: one line on stderr, no traceback, exit 2
    for argv in (
        ["registry", "promote", "--name", name, "--version", "9", "--stage", "production"],
        ["registry", "register", "--name", name, "--run-id", run_id, "--epoch", "7"],
        ["registry", "list", "--name", "missing"],
    ):
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith("mococxr: error: ") and captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.err + captured.out


def _fake_finetune(experiment: str, name: str, version: str, status: str = "FINISHED") -> str:
    """A fine-tune run's tags and params as finetune logs them for a models:/ init (no training)."""
    with mt.start_run(experiment, run_tags=mt.tags(kind="finetune", registry_version=version)) as active:
        mlflow.log_params({"init_registered_model": name, "init_registry_version": version})
        run_id = active.info.run_id
    if status != "FINISHED":
        mlflow.tracking.MlflowClient().set_terminated(run_id, status)
    return run_id


def test_a_version_counts_the_finetune_runs_that_used_it(name, run):
    client = mlflow.tracking.MlflowClient()
    version = registry.register(name, run_id=run[0], epoch=2)
    described = client.get_model_version(name, version).description
    assert f"pretraining run {run[0]} at epoch 2" in described and "train/loss 2" in described
    assert client.get_registered_model(name).description.startswith("MoCo v2 pretrained")

    _fake_finetune("ft-a", name, version)
    _fake_finetune("ft-b", name, version)  # another experiment counts too
    _fake_finetune("ft-a", name, version, status="FAILED")  # did not finish: not a consumer
    _fake_finetune("ft-a", f"{name}-other", version)  # the same version number of another model
    # two workers recording at once (or one twice) both write the recount, never count + 1
    assert [registry.record_finetune_use(name, version) for _ in range(2)] == [2, 2]
    mv = client.get_model_version(name, version)
    assert mv.tags[registry.FINETUNE_RUNS_TAG] == "2"
    assert mv.description.startswith(described) and mv.description.count(registry.USES_HEADING) == 1
    exp_ids = [client.get_experiment_by_name(e).experiment_id for e in ("ft-a", "ft-b")]
    assert (
        len(client.search_runs(exp_ids, registry.consumers_filter(name, version))) == 2
    )  # the filter shown works
    with pytest.warns(UserWarning, match="could not record"):
        assert registry.record_finetune_use(name, "99") is None
