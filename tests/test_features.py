"""The frozen-feature cache: a linear run from cached features equals the run through the encoder, the
features of an encoder and image set are computed once, and the cache is keyed, bounded and disposable.
Also the validation cadence of ``val_every``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from linear_runs import history, linear_cfg
from mlflow.tracking import MlflowClient

from mococxr.config import FinetuneConfig
from mococxr.data.phantom import synthesize
from mococxr.data.prepare import prepare
from mococxr.models.backbones import build_encoder
from mococxr.train import features as fc
from mococxr.train import finetune as ft
from mococxr.train.budget import validation_epochs

TOL = 1e-6  # measured: cached and recomputed scores differ by < 1e-7 on CPU (batching of the same forwards)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return str(synthesize(tmp_path_factory.mktemp("phantom") / "ph", 200, size=64))


def make_cfg(root: str, **kw) -> FinetuneConfig:
    return linear_cfg(root, "test-features", **{"image_size": 64, "epochs": 4, **kw})


@pytest.mark.parametrize("preset", ["cxr", "none"])
def test_cached_features_give_the_run_that_recomputes_them(phantom, tracking_uri, preset):
    """Same config with and without the cache: the same val AUC every epoch, best epoch and test scores
    (with preset none the head trains on cached training features, in the image loader's batch order)."""
    data = prepare(make_cfg(phantom).data)
    runs = {
        cached: ft.finetune(make_cfg(phantom, preset=preset, feature_cache=cached), data=data, progress=False)
        for cached in (False, True)
    }
    a, b = runs[False], runs[True]
    assert a.best_epoch == b.best_epoch
    for (sa, va), (sb, vb) in zip(history(a.run_id, "val/auc"), history(b.run_id, "val/auc"), strict=True):
        assert sa == sb and vb == pytest.approx(va, abs=TOL)
    assert history(b.run_id, "train/loss")[-1][1] == pytest.approx(
        history(a.run_id, "train/loss")[-1][1], rel=1e-5
    )
    scores = [r.predictions["score:Pleural Effusion"].to_numpy() for r in (a, b)]
    np.testing.assert_allclose(scores[1], scores[0], atol=TOL, rtol=0)
    assert b.test["test/auc"] == pytest.approx(a.test["test/auc"], abs=TOL)
    params = MlflowClient().get_run(b.run_id).data.params
    assert (
        params["feature_cache"] == "True"
        and params["feature_cache_dir"] == os.environ["MOCOCXR_FEATURE_CACHE"]
    )
    # val and test (and train with preset none, plus the probe's train features with cxr) computed once;
    # the other reads (every epoch's val, the probe's) are hits
    assert params["feature_cache_misses"] == "3" and int(params["feature_cache_hits"]) >= 4
    assert "feature_cache_misses" not in MlflowClient().get_run(a.run_id).data.params


def test_features_are_computed_once_per_encoder_and_image_set(phantom, tracking_uri, monkeypatch, tmp_path):
    """A second learning rate and a second draw from the same checkpoint read val and test from disk."""
    torch.manual_seed(3)
    checkpoint = tmp_path / "encoder.pt"
    torch.save(build_encoder("resnet18", init="random").state_dict(), checkpoint)
    extracted: list[frozenset] = []
    extract = fc.extract_features

    def spy(encoder, records, **kw):
        extracted.append(frozenset(records["image_id"]))
        return extract(encoder, records, **kw)

    monkeypatch.setattr(fc, "extract_features", spy)
    data = prepare(make_cfg(phantom).data)
    val, test = (frozenset(data.splits[k]["image_id"]) for k in ("val", "test"))
    run = {"preset": "none", "fraction": 0.5, "init": str(checkpoint)}
    ft.finetune(make_cfg(phantom, draw=0, **run), data=data, progress=False)
    assert len(extracted) == 3 and {val, test} <= set(extracted)  # the draw's train images, val, test
    (draw0,) = set(extracted) - {val, test}
    extracted.clear()
    ft.finetune(make_cfg(phantom, draw=0, lr=1e-3, **run), data=data, progress=False)
    assert extracted == []  # same checkpoint, same draw: nothing recomputed
    ft.finetune(make_cfg(phantom, draw=1, **run), data=data, progress=False)
    assert len(extracted) == 1 and extracted[0] not in (val, test, draw0)  # the new draw's train images only


def test_the_key_is_the_weights_and_the_images(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("resnet18", init="random")
    same = build_encoder("resnet18", init="checkpoint", state_dict=enc.state_dict())
    torch.manual_seed(1)
    other = build_encoder("resnet18", init="random")
    assert fc.encoder_fingerprint(enc) == fc.encoder_fingerprint(same) != fc.encoder_fingerprint(other)
    records = pd.DataFrame({"image_id": ["a", "b"], "path": ["x/a.png", "x/b.png"]})
    cache = fc.FeatureCache(enc, 64, tmp_path)
    assert cache.key(records) != cache.key(records.iloc[::-1].reset_index(drop=True))
    assert cache.key(records) != fc.FeatureCache(enc, 32, tmp_path, fingerprint=cache.fingerprint).key(
        records
    )
    assert cache.key(records) != fc.FeatureCache(other, 64, tmp_path).key(records)


def test_a_damaged_entry_is_recomputed_and_an_unwritable_folder_only_costs_time(phantom, tmp_path):
    data = prepare(make_cfg(phantom).data)
    val = data.splits["val"]
    enc = build_encoder("resnet18", init="random")
    cache = fc.FeatureCache(enc, 64, tmp_path / "features")
    first = np.array(cache.features(val))
    entry = tmp_path / "features" / cache.key(val)
    assert (entry / fc.MATRIX).stat().st_size == first.nbytes
    with open(entry / fc.MATRIX, "r+b") as f:  # truncated by a full disk or a kill
        f.truncate(100)
    again = fc.FeatureCache(enc, 64, tmp_path / "features")
    np.testing.assert_array_equal(np.array(again.features(val)), first)
    assert again.stats["misses"] == 1 and (entry / fc.MATRIX).stat().st_size == first.nbytes
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    np.testing.assert_array_equal(fc.FeatureCache(enc, 64, blocked / "features").features(val), first)


def test_the_cache_stays_under_its_bound_least_recently_used_first(tmp_path, monkeypatch):
    root = tmp_path / "features"
    for i, name in enumerate(["old", "mid", "new"]):
        (root / name).mkdir(parents=True)
        (root / name / fc.MATRIX).write_bytes(b"\0" * 1000)
        os.utime(root / name, (1000 + i, 1000 + i))
    (root / ".writing-x").mkdir()  # a writer at work is never evicted
    removed = fc.evict(root, keep=root / "old", limit=2100)
    assert removed == [root / "mid"]
    assert sorted(p.name for p in root.iterdir()) == [".writing-x", "new", "old"]
    monkeypatch.setenv("MOCOCXR_FEATURE_CACHE_GB", "0.0000005")  # 500 bytes: not even one entry fits
    assert fc.evict(root) and sorted(p.name for p in root.iterdir()) == [".writing-x"]


def test_the_cache_folder_follows_the_environment_then_the_image_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MOCOCXR_FEATURE_CACHE")
    assert fc.cache_root(str(tmp_path / "img")) == tmp_path / "img" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fc.cache_root(None) == tmp_path / "xdg" / "mococxr" / "features"
    monkeypatch.setenv("MOCOCXR_FEATURE_CACHE", str(tmp_path / "env"))
    assert fc.cache_root(str(tmp_path / "img")) == Path(tmp_path / "env")


def test_validation_cadence_keeps_the_last_epoch_and_chooses_among_validated_epochs(phantom, tracking_uri):
    assert validation_epochs(7, 3) == [3, 6, 7] and validation_epochs(6, 3) == [3, 6]
    assert validation_epochs(4, 1) == [1, 2, 3, 4] and validation_epochs(2, 5) == [2]
    result = ft.finetune(
        make_cfg(phantom, protocol="e2e", epochs=3, val_every=2, lr=1e-4, fraction=0.5), progress=False
    )
    assert [s for s, _ in history(result.run_id, "val/auc")] == [2, 3]
    assert [s for s, _ in history(result.run_id, "train/loss")] == [1, 2, 3]
    assert result.best_epoch in (2, 3)
    best = max(history(result.run_id, "val/auc"), key=lambda sv: sv[1])
    assert result.best_epoch == best[0]
