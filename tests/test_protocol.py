"""Fidelity of the linear protocol: the head switch, the optimizer-step floor, the gap to the fast probe,
and ``--init auto`` saying so when it falls back to random weights."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from mococxr.config import DataConfig, FinetuneConfig, PretrainConfig
from mococxr.data.phantom import synthesize
from mococxr.models.backbones import IMAGENET_ENV, build_encoder, imagenet_weights_filename
from mococxr.tracking import mlflow as mt
from mococxr.train import finetune as ft
from mococxr.train import inits
from mococxr.train.budget import epochs_for_fraction
from mococxr.train.pretrain import pretrain


@pytest.fixture(scope="module")
def shenzhen(tmp_path_factory) -> str:
    """120 Shenzhen-layout phantom images at 64 px (one per patient, half TB)."""
    return str(synthesize(tmp_path_factory.mktemp("sz") / "sz", 120, size=64, seed=0, layout="shenzhen"))


def data_cfg(root: str) -> DataConfig:
    return DataConfig(dataset="shenzhen", root=root, task="tb", val=0.2, test=0.2)


def make_cfg(root: str, **kw) -> FinetuneConfig:
    base = {
        "image_size": 32,
        "batch_size": 8,
        "lr": 1e-3,
        "protocol": "linear",
        "experiment": "test-protocol",
    }
    return FinetuneConfig(data=data_cfg(root), **{**base, **kw})


@pytest.fixture()
def no_imagenet(tmp_path, monkeypatch) -> str:
    """No ImageNet weights anywhere init auto looks; a fresh process as far as the fallback line goes.
    Returns where the hub file was looked for."""
    monkeypatch.delenv(IMAGENET_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inits, "_FALLBACKS_SAID", set())
    return str(tmp_path / "hub" / "checkpoints" / imagenet_weights_filename("resnet18"))


def test_head_switch_decides_what_sits_between_features_and_linear_layer():
    def norms(model: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm1d) for m in model.modules())

    assert norms(ft.Classifier(build_encoder("resnet18"), 1, frozen=True)) == 1
    plain = ft.Classifier(build_encoder("resnet18"), 1, frozen=True, standardize=False)
    assert norms(plain) == 0 and isinstance(plain.norm, nn.Identity)
    assert {k for k, p in plain.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert norms(ft.Classifier(build_encoder("resnet18"), 1, frozen=False)) == 0  # e2e: never standardised


def test_budget_rule_min_steps_is_a_floor_on_either_epoch_rule():
    cfg = FinetuneConfig(fraction=0.0625)
    today = ft.training_budget(cfg, 1)  # Shenzhen 6.25 %: ~29 images, batch 16, last partial batch dropped
    assert (today.epochs, today.optimizer_steps) == (epochs_for_fraction(0.0625), 52)
    assert today.params() == {"epochs_resolved": 52, "steps_per_epoch": 1, "optimizer_steps": 52}
    assert (
        today.describe()
        == "52 (MoCo-CXR's label-fraction schedule for 6.25%); 52 optimizer steps, 1 per epoch"
    )
    raised = ft.training_budget(FinetuneConfig(fraction=0.0625, min_steps=500), 1)
    assert (raised.epochs, raised.rule_epochs, raised.optimizer_steps) == (500, 52, 500)
    assert raised.describe().startswith("500 (min_steps 500 raised them from 52, MoCo-CXR's label-fraction")
    met = ft.training_budget(FinetuneConfig(fraction=0.0625, min_steps=30), 1)
    assert met.epochs == 52 and "min_steps 30 already met" in met.describe()
    explicit = ft.training_budget(
        FinetuneConfig(epochs=10, min_steps=25), 2
    )  # an explicit --epochs is a floor too
    assert (explicit.epochs, explicit.optimizer_steps) == (
        13,
        26,
    ) and "from 10, set by --epochs" in explicit.describe()
    assert ft.training_budget(FinetuneConfig(epochs=10, min_steps=25), 0).steps_per_epoch == 1


def test_plain_head_with_min_steps_and_init_auto_fallback(
    shenzhen, tracking_uri, no_imagenet, monkeypatch, capsys
):
    built: list[ft.Classifier] = []
    classifier = ft.Classifier

    def spy(*args, **kwargs):
        model = classifier(*args, **kwargs)
        built.append(model)
        model.initial_head = model.head.weight.detach().clone()
        return model

    monkeypatch.setattr(ft, "Classifier", spy)
    cfg = make_cfg(shenzhen, init="auto", head="plain", fraction=0.25, epochs=1, min_steps=5)
    res = ft.finetune(cfg, progress=False)

    # init auto fell back to random: one line on stderr naming where it looked, and a tag on the run
    said = [line for line in capsys.readouterr().err.splitlines() if "init auto" in line]
    assert said == [
        f"mococxr: init auto: no ImageNet weights for resnet18 at {no_imagenet}; started from random "
        f"init (put torchvision's resnet18-f37072fd.pth there, or pass --init random to silence this)"
    ]
    assert inits.resolve_init("auto", "resnet18")[:2] == ("random", None)
    assert "init auto" not in capsys.readouterr().err  # once per process
    run = MlflowClient().get_run(res.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags[inits.INIT_FALLBACK_TAG].startswith("init auto: no ImageNet weights for resnet18 at ")
    assert tags[mt.tag("init")] == "random" and params["init_resolved"] == "random"

    # the plain head: nothing between the frozen features and the linear layer, and it trained
    model = built[0]
    assert isinstance(model.norm, nn.Identity) and not torch.equal(model.head.weight, model.initial_head)

    # 18 draw images, batch 8, last partial batch dropped: 2 steps per epoch; min_steps 5 -> 3 epochs
    assert params["head"] == "plain" and params["min_steps"] == "5" and int(params["n_train"]) == 18
    assert (params["steps_per_epoch"], params["epochs_resolved"], params["optimizer_steps"]) == (
        "2",
        "3",
        "6",
    )
    history = sorted(m.step for m in MlflowClient().get_metric_history(res.run_id, "val/auc"))
    assert history == [1, 2, 3]

    # the probe on the same draw and val images, and the gap to the run's best validation AUC
    assert 0.0 <= metrics["val/probe_auc"] <= 1.0 and metrics["val/probe_seconds"] > 0
    assert metrics["val/probe_gap"] == pytest.approx(metrics["val/probe_auc"] - metrics["best/val_auc"])
    note = tags["mlflow.note.content"]
    for text in (
        "head plain, as in the paper",
        "init **random** (init auto: no ImageNet weights",
        "Epochs: 3 (min_steps 5 raised them from 1, set by --epochs); 6 optimizer steps, 2 per epoch",
        "**Probe**: a logistic regression on the frozen features of the same 18 training images",
        f"{metrics['val/probe_gap']:+.4f} (`val/probe_gap`",
    ):
        assert text in note, text
    assert "from `auto`" not in note


def test_e2e_runs_have_no_probe(shenzhen, tracking_uri):
    res = ft.finetune(make_cfg(shenzhen, protocol="e2e", fraction=0.25, epochs=1), progress=False)
    run = MlflowClient().get_run(res.run_id)
    assert not {k for k in run.data.metrics if k.startswith("val/probe")}
    note = run.data.tags["mlflow.note.content"]
    assert (
        "**Probe**" not in note
        and "protocol end-to-end (all layers trained)" in note
        and "standardized" not in note
    )


def test_pretrain_run_is_tagged_when_init_auto_falls_back(shenzhen, tracking_uri, no_imagenet, capsys):
    cfg = PretrainConfig(
        data=data_cfg(shenzhen),
        init="auto",
        image_size=32,
        batch_size=16,
        epochs=1,
        moco_k=32,
        workers=0,
        experiment="test-protocol-pretrain",
    )
    res = pretrain(cfg, progress=False)
    assert sum("mococxr: init auto" in line for line in capsys.readouterr().err.splitlines()) == 1
    tags = MlflowClient().get_run(res.run_id).data.tags
    assert no_imagenet in tags[inits.INIT_FALLBACK_TAG] and tags[mt.tag("init")] == "random"
    assert "random init; init auto: no ImageNet weights" in tags["mlflow.note.content"]
    assert math.isfinite(res.history[1]["train/loss"])
