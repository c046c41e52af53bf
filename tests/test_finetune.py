"""Fine-tuning on the phantom: what a run logs, the two protocols, masked BCE, and test-set isolation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score, roc_auc_score

from mococxr.config import DataConfig, FinetuneConfig
from mococxr.data.labels import label_matrix
from mococxr.data.phantom import MARKER, synthesize
from mococxr.data.prepare import prepare
from mococxr.data.records import read_records
from mococxr.data.splits import make_manifest
from mococxr.errors import ConfigError, DataError
from mococxr.models.backbones import build_encoder
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import registry
from mococxr.train import finetune as ft
from mococxr.train.budget import epochs_for_fraction

TWO_TASKS = "Pleural Effusion,Cardiomegaly"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    """200 CheXpert-layout phantom rows at 64 px (about 165 frontal images), written once per module."""
    return str(synthesize(tmp_path_factory.mktemp("phantom") / "ph", 200, size=64))


def data_cfg(root: str, task: str = "pleural_effusion") -> DataConfig:
    return DataConfig(dataset="chexpert", root=root, task=task, val=0.25, test=0.2)


def make_cfg(root: str, *, task: str = "pleural_effusion", **kw) -> FinetuneConfig:
    base = {"image_size": 64, "batch_size": 32, "epochs": 2, "lr": 1e-3, "experiment": "test-finetune"}
    return FinetuneConfig(data=data_cfg(root, task), **{**base, **kw})


@pytest.fixture()
def captured(monkeypatch) -> dict:
    """The encoder finetune builds, and a copy of its state right after it was built."""
    box: dict = {}
    build = ft.build_encoder

    def spy(*args, **kwargs):
        encoder = build(*args, **kwargs)
        box["encoder"] = encoder
        box["initial"] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        return encoder

    monkeypatch.setattr(ft, "build_encoder", spy)
    return box


def registered_checkpoint(name: str = "mococxr-test") -> tuple[str, str, dict[str, torch.Tensor]]:
    """A random resnet18 logged as a pretraining run's epoch-3 LoggedModel and registered: (uri, run id,
    state)."""
    torch.manual_seed(123)
    state = build_encoder("resnet18").state_dict()
    mt.open_store()
    with mt.start_run("test-pretrain", run_tags=mt.tags(kind="pretrain")) as run:
        model_id = ma.log_state_dict_model(
            state,
            name="resnet18-epoch003",
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            step=3,
            info={"backbone": "resnet18", "epoch": 3, "run_id": run.info.run_id},
        )
    version = registry.register(name, model_id=model_id)
    return f"models:/{name}/{version}", run.info.run_id, state


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def download_predictions(run_id: str) -> pd.DataFrame:
    return pd.read_parquet(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions/test.parquet")
    )


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


# -- pure functions ---------------------------------------------------------------------------------
def test_epochs_for_fraction_follows_the_paper_and_interpolates_in_log_fraction():
    assert [epochs_for_fraction(f) for f in (0.001, 0.01, 0.1, 1.0)] == [220, 95, 41, 18]
    # linear in log10(fraction) between the paper's points: 5 % sits 0.699 of the way from 1 % to 10 %
    assert epochs_for_fraction(0.05) == round(95 + (math.log10(0.05) + 2) * (41 - 95)) == 57
    assert epochs_for_fraction(10**-2.5) == round((220 + 95) / 2)
    assert epochs_for_fraction(0.5) == 25
    assert epochs_for_fraction(0.0001) == 220  # clamped below the smallest point
    fractions = np.logspace(-3, 0, 40)
    assert np.all(np.diff([epochs_for_fraction(f) for f in fractions]) <= 0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="fraction"):
            epochs_for_fraction(bad)


def test_masked_bce_ignores_nan_labels_exactly():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor(
        [[1, 0, np.nan], [np.nan, 1, 0], [0, np.nan, np.nan], [1, 1, 1], [np.nan, np.nan, np.nan], [0, 0, 1]],
        dtype=torch.float32,
    )
    loss = ft.masked_bce(logits, target)
    known = ~torch.isnan(target)
    expected = F.binary_cross_entropy_with_logits(logits[known], target[known])
    assert torch.isfinite(loss) and torch.equal(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)
    # the NaN entries' logits have no influence at all
    changed = logits.detach().clone()
    changed[~known] = 1e6
    assert torch.equal(ft.masked_bce(changed, target), expected.detach())
    empty = torch.randn(2, 2, requires_grad=True)
    none_known = ft.masked_bce(empty, torch.full((2, 2), float("nan")))
    none_known.backward()
    assert none_known.item() == 0.0 and torch.all(empty.grad == 0)


def test_bad_protocol_and_empty_split_are_reported(phantom, tracking_uri):
    with pytest.raises(ConfigError, match="protocol"):
        ft.finetune(make_cfg(phantom, protocol="knn"))
    data = prepare(data_cfg(phantom))
    data = dataclasses.replace(data, splits={**data.splits, "val": data.splits["val"].iloc[:0]})
    with pytest.raises(DataError, match="val split is empty"):
        ft.finetune(make_cfg(phantom), data=data, progress=False)


# -- runs on the phantom -----------------------------------------------------------------------------
def test_linear_run_logs_everything_and_keeps_the_backbone_frozen(phantom, tracking_uri, captured):
    uri, pretrain_run, state = registered_checkpoint()
    cfg = make_cfg(phantom, task=TWO_TASKS, protocol="linear", init=uri, epochs=2)
    splits = prepare(cfg.data).splits
    assert (Path(phantom) / MARKER).is_file()  # synthesize marks every folder it writes
    res = ft.finetune(cfg, progress=False)

    client = MlflowClient()
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["protocol"] == "linear" and params["init"] == uri and params["data.task"] == TWO_TASKS
    assert params["epochs_resolved"] == "2" and params["init_resolved"] == "checkpoint"
    assert params["head"] == "standardized" and params["min_steps"] == "0"
    steps = len(splits["train"]) // cfg.batch_size  # the last partial batch is dropped
    assert (params["steps_per_epoch"], params["optimizer_steps"]) == (str(steps), str(2 * steps))
    # every linear run is set against the fast probe on its own draw: both tasks probed, so a gap
    assert run.data.metrics["val/probe_gap"] == pytest.approx(run.data.metrics["val/probe_auc"] - res.val_auc)
    assert int(params["n_test"]) == len(splits["test"]) and int(params["n_val"]) == len(splits["val"])
    tags = run.data.tags
    train_manifest = make_manifest("train", splits["train"], seed=cfg.seed, fraction=1.0, draw=0)
    test_manifest = make_manifest("test", splits["test"], seed=cfg.data.split_seed)
    expected = {
        "kind": "finetune",
        "init": "moco",
        "protocol": "linear",
        "dataset": "chexpert",
        "task": TWO_TASKS,
        "label_fraction": "1.0",
        "draw": "0",
        "pretrain_run_id": pretrain_run,
        "checkpoint_epoch": "3",
        "registry_version": "1",
        "backbone": "resnet18",
        "manifest_sha256": train_manifest.sha256,
        "test_manifest_sha256": test_manifest.sha256,
    }
    assert {k: tags.get(mt.tag(k)) for k in expected} == expected

    per_epoch = [
        "train/loss",
        "val/loss",
        "val/auc",
        "val/auprc",
        "val/auc_Pleural_Effusion",
        "val/auc_Cardiomegaly",
    ]
    for key in per_epoch:
        steps = [s for s, _ in history(client, res.run_id, key)]
        assert steps == [1, 2], key
    val_aucs = dict(history(client, res.run_id, "val/auc"))
    assert res.best_epoch == max(val_aucs, key=lambda e: (val_aucs[e], -e))
    assert res.val_auc == pytest.approx(val_aucs[res.best_epoch])
    # linear_lr paper (the default): the head trained at lr alone, said as the chosen lr; best-at-last flag
    assert params["linear_lr"] == "paper" and float(params["linear_lr_chosen"]) == cfg.lr
    assert tags[mt.tag("linear_lr")] == f"{cfg.lr:g}" and not any(
        k.startswith("lr_select/") for k in run.data.metrics
    )
    assert run.data.metrics["best/at_last_epoch"] == float(res.best_epoch == 2)
    assert tags[mt.tag("best_at_last_epoch")] == ("true" if res.best_epoch == 2 else "false")

    predictions = download_predictions(res.run_id)
    assert len(predictions) == len(splits["test"]) and predictions["image_id"].is_unique
    assert predictions["image_id"].tolist() == splits["test"]["image_id"].tolist()
    y = label_matrix(splits["test"], TWO_TASKS.split(","))
    logged = run.data.metrics
    for j, task in enumerate(TWO_TASKS.split(",")):
        np.testing.assert_array_equal(predictions[f"label:{task}"].to_numpy(), y[:, j])
        known = ~np.isnan(y[:, j])
        scores = predictions[f"score:{task}"].to_numpy()[known]
        key = task.replace(" ", "_")
        assert logged[f"test/auc_{key}"] == pytest.approx(roc_auc_score(y[known, j], scores))
        assert logged[f"test/auprc_{key}"] == pytest.approx(average_precision_score(y[known, j], scores))
    assert logged["test/auc"] == pytest.approx(
        np.mean([logged["test/auc_Pleural_Effusion"], logged["test/auc_Cardiomegaly"]])
    )

    for name, part in (("train", splits["train"]), ("val", splits["val"]), ("test", splits["test"])):
        manifest = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/manifests/{name}.json")
        assert sorted(manifest["image_ids"]) == sorted(part["image_id"])
    assert (
        mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/manifests/test.json")["sha256"]
        == test_manifest.sha256
    )

    assert_explains_itself(client, run, res, splits, pretrain_run)

    # frozen: weights and BatchNorm running statistics are exactly the checkpoint's after training
    assert_same_state(captured["encoder"].state_dict(), state)
    assert_same_state(captured["encoder"].state_dict(), captured["initial"])


def assert_explains_itself(client: MlflowClient, run, res, splits, pretrain_run: str) -> None:
    """What a user sees of a run and its checkpoint's version in the MLflow UI."""
    note = run.data.tags["mlflow.note.content"]
    for text in (
        "protocol linear",
        "init **moco**",
        "from `models:/mococxr-test/1`, Adam",
        "registered as [mococxr-test version 1](#/models/mococxr-test/versions/1)",
        "of pretraining run [",
        f"/runs/{pretrain_run}) at epoch 3",
        "Label fraction **100%**",
        "draw 0",
        "Dataset chexpert (synthetic phantom)",
        f"task {TWO_TASKS}",
        "Epochs: 2 (set by --epochs)",
        "on standardized features (parameter-free BatchNorm, head standardized)",
        "**Probe**",
        "best validation AUC",
        f"best epoch {res.best_epoch} of 2",
    ):
        assert text in note, text
    assert run.data.params["phantom"] == "True" and run.data.params["init_registered_model"] == "mococxr-test"
    metrics = run.data.metrics
    assert metrics["best/epoch"] == res.best_epoch and metrics["best/val_auc"] == pytest.approx(res.val_auc)
    assert "best_epoch" not in metrics and "val/best_auc" not in metrics  # one spelling: split/name

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for context, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        manifest = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/manifests/{name}.json")
        assert inputs[context].digest == manifest["sha256"][:16]
        assert json.loads(inputs[context].profile)["num_rows"] == len(splits[name])
    assert inputs["train"].name == "chexpert-phantom train 100% draw 0"
    version = client.get_model_version("mococxr-test", "1")
    # the checkpoint, and its stand-in in this run's experiment (what the run page can list)
    checkpoint = version.tags["mococxr.model_id"]
    (stand_in,) = {m.model_id for m in run.inputs.model_inputs} - {checkpoint}
    assert len(run.inputs.model_inputs) == 2
    assert client.get_logged_model(stand_in).tags["mococxr.model_id"] == checkpoint
    assert not run.outputs.model_outputs  # keep_model e2e (the default): a linear run keeps no model
    assert "**Started from** checkpoint [e03-resnet18](#/experiments/" in note
    csv = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=res.run_id, artifact_path="predictions/test.csv")
    )
    pd.testing.assert_frame_equal(csv, download_predictions(res.run_id), check_dtype=False)

    # the version names the runs that used it: a recount, the same however often it is recorded
    assert version.tags["mococxr.finetune_runs"] == "1"
    assert "tags.`mococxr.registry_version` = '1'" in version.description
    assert registry.record_finetune_use("mococxr-test", "1") == 1
    assert client.get_model_version("mococxr-test", "1").description == version.description


def test_e2e_multilabel_u_ignore_trains_the_backbone(phantom, tracking_uri, captured):
    cfg = make_cfg(phantom, task="competition5", protocol="e2e", fraction=0.5, draw=1, epochs=1)
    data = prepare(cfg.data)
    splits = data.splits
    res = ft.finetune(cfg, data=data, progress=False)

    after = captured["encoder"].state_dict()
    conv = "trunk.conv1.weight"
    assert not torch.equal(after[conv], captured["initial"][conv])
    bn = "trunk.bn1.running_mean"
    assert not torch.equal(after[bn], captured["initial"][bn])

    run = MlflowClient().get_run(res.run_id)
    tags = run.data.tags
    assert tags[mt.tag("init")] == "random" and tags[mt.tag("protocol")] == "e2e"
    assert tags[mt.tag("label_fraction")] == "0.5" and tags[mt.tag("draw")] == "1"
    assert (
        "Label fraction **50%**" in tags["mlflow.note.content"] and run.data.params["phantom"] == "True"
    )  # synthesize marks its folder
    assert not run.inputs.model_inputs and "init_registered_model" not in run.data.params
    assert "val/probe_auc" not in run.data.metrics and "val/probe_gap" not in run.data.metrics
    assert mt.tag("pretrain_run_id") not in tags and mt.tag("registry_version") not in tags
    n_train = int(run.data.params["n_train"])
    assert 0 < n_train < len(splits["train"])
    # one epoch: the best validated epoch is the last, flagged; e2e has no linear lr
    assert run.data.metrics["best/at_last_epoch"] == 1.0 and tags[mt.tag("best_at_last_epoch")] == "true"
    assert "linear_lr_chosen" not in run.data.params and mt.tag("linear_lr") not in tags
    assert run.info.run_name == "d1 50% e2e random r18"  # what tells a grid's runs apart comes first
    assert_keeps_its_model(run, res, after)

    # U-Ignore: an uncertain (-1) source label is NaN in the logged labels, and masked out of the loss
    predictions = download_predictions(res.run_id)
    raw = read_records("chexpert", phantom).set_index("image_id").loc[predictions["image_id"]]
    uncertain = raw["Pleural Effusion"].to_numpy() == -1.0
    assert uncertain.any(), "the phantom's test split should hold uncertain effusion labels"
    assert np.isnan(predictions.loc[uncertain, "label:Pleural Effusion"]).all()
    assert set(np.unique(predictions["label:Pleural Effusion"].dropna())) <= {0.0, 1.0}
    assert math.isfinite(run.data.metrics["train/loss"])
    for task in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"):
        assert f"score:{task}" in predictions


def assert_keeps_its_model(run, res, encoder_state: dict[str, torch.Tensor]) -> None:
    """keep_model e2e (the default): an end-to-end run logs its trained model as its output at its best
    epoch, with its test metrics; the disk it costs is the full ResNet18 (about 44.8 MB)."""
    client = MlflowClient()
    assert run.data.params["keep_model"] == "e2e"
    (output,) = run.outputs.model_outputs
    assert output.step == res.best_epoch
    model = client.get_logged_model(output.model_id)
    assert (
        model.source_run_id == res.run_id and model.name == f"e{res.best_epoch:02d}-d1 50pct e2e random r18"
    )
    assert model.model_type == "mococxr-classifier"
    assert {m.key: m.value for m in model.metrics}["test/auc"] == pytest.approx(res.test["test/auc"])
    assert f"#/experiments/{run.info.experiment_id}/runs/{res.run_id}" in model.tags["mlflow.note.content"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}")) / ma.STATE_DICT_FILE
    assert 44e6 < local.stat().st_size < 46e6, local.stat().st_size  # measured: 44.79 MB
    kept = torch.load(local, map_location="cpu", weights_only=True)
    assert_same_state(
        {k.removeprefix("encoder."): v for k, v in kept.items() if k.startswith("encoder.")}, encoder_state
    )
    assert {"head.weight", "head.bias"} <= kept.keys()


@pytest.mark.parametrize("feature_cache", [True, False])
def test_the_test_split_never_influences_training_or_epoch_selection(
    phantom, tracking_uri, monkeypatch, feature_cache
):
    """Same seed, different test labels and images: identical val history, best epoch, val predictions;
    with cached features as with images through the encoder every epoch."""
    calls: list[tuple[str, np.ndarray]] = []
    model_inputs = ft.model_inputs

    def spy(*args, **kwargs):
        inputs = model_inputs(*args, **kwargs)
        score = inputs.score

        def scored(records):
            scores = score(records)
            calls.append((records["image_id"].iloc[0], scores))
            return scores

        return dataclasses.replace(inputs, score=scored)

    monkeypatch.setattr(ft, "model_inputs", spy)
    cfg = make_cfg(phantom, protocol="linear", epochs=3, lr=3e-3, feature_cache=feature_cache)
    data = prepare(cfg.data)
    splits = data.splits
    test = splits["test"].copy()
    test["Pleural Effusion"] = 1.0 - test["Pleural Effusion"]  # flipped labels (NaN stays NaN)
    test["path"] = test["path"].to_numpy()[::-1]  # and every test image swapped for another
    altered = dataclasses.replace(data, splits={**splits, "test": test})

    results, seen = [], []
    for parts in (data, altered):
        calls.clear()
        results.append(ft.finetune(cfg, data=parts, progress=False))
        seen.append(list(calls))
    client = MlflowClient()
    hist = [history(client, r.run_id, "val/auc") for r in results]
    assert hist[0] == hist[1] and len(hist[0]) == 3
    assert results[0].best_epoch == results[1].best_epoch
    val_first, test_first = splits["val"]["image_id"].iloc[0], splits["test"]["image_id"].iloc[0]
    for run_calls in seen:  # three val predictions (one per epoch), then the test set exactly once
        assert [who for who, _ in run_calls] == [val_first] * 3 + [test_first]
    for (_, a), (_, b) in zip(seen[0][:3], seen[1][:3], strict=True):
        np.testing.assert_array_equal(a, b)
    assert results[0].test["test/auc"] != pytest.approx(results[1].test["test/auc"])


@pytest.mark.realdata
@pytest.mark.slow
def test_nih_pneumonia_random_vs_moco_checkpoint(nih_sample, tracking_uri):
    """Real radiographs end to end: a short MoCo pretrain on the sample, then linear fine-tunes of
    random and MoCo inits on the patient-level split; runs, tags and predictions land in MLflow."""
    from mococxr.config import PretrainConfig
    from mococxr.train.pretrain import pretrain

    data = DataConfig(dataset="nih", root=str(nih_sample), task="pneumonia")
    pre = pretrain(
        PretrainConfig(
            data=data,
            init="random",
            image_size=64,
            batch_size=32,
            epochs=2,
            moco_k=4096,
            workers=0,
            experiment="test-nih-pretrain",
        ),
        progress=False,
    )
    uri = f"models:/{pre.model_ids[2]}"
    prepared = prepare(data)
    splits = prepared.splits
    patients = {name: set(part["patient_id"]) for name, part in splits.items()}
    assert not (patients["test"] & (patients["train"] | patients["val"]))

    client = MlflowClient()
    aucs = {}
    for init in ("random", uri):
        cfg = FinetuneConfig(
            data=data,
            init=init,
            protocol="linear",
            epochs=5,
            lr=1e-3,
            batch_size=32,
            image_size=64,
            experiment="test-nih-finetune",
        )
        res = ft.finetune(cfg, data=prepared, progress=False)
        run = client.get_run(res.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[mt.tag("dataset")] == "nih"
        predictions = download_predictions(res.run_id)
        assert predictions["image_id"].tolist() == splits["test"]["image_id"].tolist()
        assert 0.0 <= res.test["test/auc"] <= 1.0
        if init == uri:
            assert run.data.tags[mt.tag("pretrain_run_id")] == pre.run_id
            assert run.data.tags[mt.tag("checkpoint_epoch")] == "2"
        aucs["moco" if init == uri else "random"] = (
            res.val_auc,
            res.test["test/auc"],
            res.test["test/auprc"],
        )
    for name, (val_auc, test_auc, test_ap) in aucs.items():
        print(
            f"NIH pneumonia, {name:>6} init, linear 64 px: val AUC {val_auc:.4f}  test AUC {test_auc:.4f}  "
            f"test AUPRC {test_ap:.4f}  "
            f"({len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])} images)"
        )
