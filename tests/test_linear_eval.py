"""Fast linear evaluation: the probe, the frozen features, and that it ranks encoders like the slow
protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mococxr.config import DataConfig, FinetuneConfig
from mococxr.data.phantom import synthesize
from mococxr.data.prepare import prepare
from mococxr.errors import DataError
from mococxr.models.backbones import build_encoder
from mococxr.train import finetune as ft
from mococxr.train.linear_eval import (
    DEFAULT_CS,
    evaluate,
    extract_features,
    fit_probe,
    linear_eval,
    make_monitor,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return str(synthesize(tmp_path_factory.mktemp("phantom") / "ph", 160, size=64))


def test_fit_probe_learns_a_separable_signal_and_ignores_nan_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = (x[:, 3] + 0.3 * rng.normal(size=300) > 0).astype(float)
    y_masked = y.copy()
    y_masked[::7] = np.nan
    x_poisoned = x.copy()
    x_poisoned[::7] = 1e3  # rows whose label is unknown must not influence the fit
    C, auc, clf, scaler = fit_probe(x_poisoned[:200], y_masked[:200], x[200:], y[200:])
    assert auc > 0.9 and C in DEFAULT_CS
    C2, auc2, _, _ = fit_probe(
        x[:200][~np.isnan(y_masked[:200])], y[:200][~np.isnan(y_masked[:200])], x[200:], y[200:]
    )
    assert (C, auc) == (C2, pytest.approx(auc2))
    noise = fit_probe(rng.normal(size=(200, 20)), y[:200], rng.normal(size=(100, 20)), y[200:])[1]
    assert noise < auc - 0.2
    with pytest.raises(DataError, match="val split holds a single class"):
        fit_probe(x[:200], y[:200], x[200:], np.zeros(100), task="Effusion")


def test_extract_features_is_frozen_ordered_and_restores_the_mode(phantom):
    records = prepare(DataConfig(root=phantom, val=0.25, test=0.2)).splits["val"].iloc[:5]
    torch.manual_seed(0)
    encoder = build_encoder("resnet18").train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    feats = extract_features(encoder, records, image_size=64, batch_size=2)
    assert feats.shape == (5, 512) and encoder.training
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval mode: BN running statistics untouched
    reversed_feats = extract_features(encoder, records.iloc[::-1], image_size=64, batch_size=5)
    np.testing.assert_allclose(reversed_feats[::-1], feats, rtol=1e-4, atol=1e-5)


def test_linear_eval_monitor_and_evaluate_report_val_auc(phantom, tmp_path):
    data = DataConfig(root=phantom, task="Pleural Effusion,Cardiomegaly", val=0.25, test=0.2)
    prepared = prepare(data)
    splits = prepared.splits
    torch.manual_seed(0)
    encoder = build_encoder("resnet18")
    result = linear_eval(
        encoder, splits["train"], splits["val"], ["Pleural Effusion", "Cardiomegaly"], image_size=64
    )
    assert set(result.per_task) == {"Pleural Effusion", "Cardiomegaly"}
    assert result.auc == pytest.approx(np.mean(list(result.per_task.values())))
    assert set(result.metrics()) == {
        "val/linear_auc",
        "val/linear_auc_Pleural_Effusion",
        "val/linear_auc_Cardiomegaly",
    }
    monitor = make_monitor(prepared, 64)
    assert monitor(1, encoder, {})["val/linear_auc"] == pytest.approx(result.auc)
    # `mococxr linear-eval`: the same evaluation of an encoder given by its init (here a file)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    cfg = FinetuneConfig(data=data, init=str(tmp_path / "encoder.pt"), image_size=64)
    assert evaluate(cfg, data=prepared).per_task == pytest.approx(result.per_task)


@pytest.mark.slow
def test_fast_linear_eval_ranks_a_trained_encoder_above_random_like_the_slow_protocol(
    tmp_path_factory, tracking_uri, monkeypatch
):
    """Supervised e2e training on one phantom; both linear evaluations on another one agree it helped."""
    root = tmp_path_factory.mktemp("rank")
    source = str(synthesize(root / "source", 400, size=64, seed=1))
    target = str(synthesize(root / "target", 300, size=64, seed=0))
    box = {}
    build = ft.build_encoder

    def spy(*args, **kwargs):
        box["encoder"] = build(*args, **kwargs)
        return box["encoder"]

    monkeypatch.setattr(ft, "build_encoder", spy)
    # trained well enough to be clearly better: with 240 images x 4 epochs the slow (feature-standardised)
    # probe found it no better than random features, which on the phantom are strong
    ft.finetune(
        FinetuneConfig(
            data=DataConfig(root=source, val=0.2, test=0.1),
            protocol="e2e",
            epochs=8,
            lr=1e-3,
            batch_size=32,
            image_size=64,
            experiment="rank-source",
        ),
        progress=False,
    )
    trained_file = root / "trained.pt"
    torch.save(box["encoder"].state_dict(), trained_file)
    torch.manual_seed(0)
    random_file = root / "random.pt"
    torch.save(build_encoder("resnet18").state_dict(), random_file)

    data = DataConfig(root=target, val=0.3, test=0.1)
    prepared = prepare(data)
    splits = prepared.splits
    fast, slow = {}, {}
    for name, path in (("trained", trained_file), ("random", random_file)):
        encoder = build_encoder("resnet18", init="checkpoint", state_dict=torch.load(path, weights_only=True))
        fast[name] = linear_eval(
            encoder, splits["train"], splits["val"], ["Pleural Effusion"], image_size=64
        ).auc
        cfg = FinetuneConfig(
            data=data,
            init=str(path),
            protocol="linear",
            epochs=8,
            lr=3e-3,
            batch_size=32,
            image_size=64,
            experiment="rank-target",
        )
        slow[name] = ft.finetune(cfg, data=prepared, progress=False).val_auc
    print(f"fast linear_eval AUC {fast}; slow linear protocol val AUC {slow}")
    assert fast["trained"] > fast["random"] + 0.02
    assert slow["trained"] > slow["random"] + 0.02
