"""The phantom writes real dataset layouts, is deterministic, and its findings are learnable but not
trivial."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mococxr.data.phantom import CHEXPERT_HEADER, synthesize, write_example
from mococxr.errors import DataError

EXPECTED_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
SMALL = "CheXpert-v1.0-small"


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / SMALL / name, dtype={"AP/PA": str})


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("phantom"), 120, size=64, seed=0, workers=1)


@pytest.fixture(scope="module")
def learn_set(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """~300 frontal images at 64 px (32 px features) with their effusion label (1.0 vs 0.0/blank)."""
    root = synthesize(tmp_path_factory.mktemp("learn"), 320, size=64, seed=0, workers=1)
    df = pd.concat([_read(root, "train.csv"), _read(root, "valid.csv")])
    df = df[(df["Frontal/Lateral"] == "Frontal") & (df["Pleural Effusion"] != -1.0)]
    y = (df["Pleural Effusion"] == 1.0).to_numpy(int)
    x = np.stack(
        [
            np.asarray(Image.open(root / p).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
            for p in df["Path"]
        ]
    )
    return x, y


def test_chexpert_layout_and_header(chexpert):
    root = chexpert / SMALL
    for name in ("train.csv", "valid.csv"):
        assert (root / name).read_text().splitlines()[0] == EXPECTED_HEADER
    assert ",".join(CHEXPERT_HEADER) == EXPECTED_HEADER
    train, valid = _read(chexpert, "train.csv"), _read(chexpert, "valid.csv")
    assert len(train) == 120 and len(valid) == 20
    assert (
        train["Path"]
        .str.match(r"^CheXpert-v1\.0-small/train/patient\d{5}/study\d+/view\d_(frontal|lateral)\.jpg$")
        .all()
    )
    assert valid["Path"].str.startswith(f"{SMALL}/valid/patient").all()
    assert all((chexpert / p).is_file() for p in pd.concat([train, valid])["Path"])
    patients = train["Path"].str.split("/").str[2]
    assert not set(patients) & set(valid["Path"].str.split("/").str[2])
    assert set(train["Sex"]) == {"Male", "Female"} and train["Age"].between(18, 90).all()


def test_chexpert_labels(chexpert):
    train, valid = _read(chexpert, "train.csv"), _read(chexpert, "valid.csv")
    obs = CHEXPERT_HEADER[5:]
    for col in ("Pleural Effusion", "Cardiomegaly"):
        values = set(train[col].dropna())
        assert {1.0, 0.0} <= values, col
        assert train[col].isna().any(), col
    assert (train[obs] == -1.0).any().any()
    assert set(np.unique(train[obs].to_numpy()[~np.isnan(train[obs].to_numpy())])) <= {-1.0, 0.0, 1.0}
    assert not valid[obs].isna().any().any() and not (valid[obs] == -1.0).any().any()
    no_finding = valid["No Finding"] == 1.0
    assert (no_finding == ((valid["Pleural Effusion"] == 0) & (valid["Cardiomegaly"] == 0))).all()
    effusion = train["Pleural Effusion"] == 1.0
    assert not (effusion & (train["No Finding"] == 1.0)).any()
    assert 0.2 < (train["Pleural Effusion"].isin([1.0, -1.0])).mean() < 0.55


def test_chexpert_studies_views_and_images(chexpert):
    train = _read(chexpert, "train.csv")
    parts = train["Path"].str.split("/")
    studies = parts.str[2] + "/" + parts.str[3]
    assert (studies.groupby(parts.str[2]).nunique() > 1).any()
    lateral = train["Frontal/Lateral"] == "Lateral"
    assert lateral.any() and train.loc[lateral, "AP/PA"].isna().all()
    assert train["Path"][lateral].str.endswith("view2_lateral.jpg").all()
    assert set(train.loc[~lateral, "AP/PA"]) == {"AP", "PA"}
    for p in train["Path"].iloc[:10]:
        with Image.open(chexpert / p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (64, 64))
            assert 20 < np.asarray(im).std()


def test_deterministic_for_a_seed_and_workers(tmp_path):
    a = synthesize(tmp_path / "a", 60, size=48, seed=3, workers=1)
    b = synthesize(tmp_path / "b", 60, size=48, seed=3, workers=2)
    c = synthesize(tmp_path / "c", 60, size=48, seed=4, workers=1)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert da != dc
    assert (
        _read(a, "train.csv").drop(columns="Path").to_numpy().tolist()
        != _read(c, "train.csv").drop(columns="Path").to_numpy().tolist()
    )


def test_effusion_brightens_the_bases(learn_set):
    """Fluid replaces air at the lung bases: the basal lateral zones are brighter on positives."""
    x, y = learn_set
    rows, left, right = slice(18, 24), slice(3, 10), slice(22, 29)
    basal = np.maximum(x[:, rows, left].mean((1, 2)), x[:, rows, right].mean((1, 2)))
    pos, neg = basal[y == 1], basal[y == 0]
    welch_t = (pos.mean() - neg.mean()) / np.sqrt(pos.var(ddof=1) / len(pos) + neg.var(ddof=1) / len(neg))
    assert 60 < len(pos) and 120 < len(neg)
    assert welch_t > 3.0
    assert roc_auc_score(y, basal) > 0.6


def test_effusion_is_learnable_but_not_trivial(learn_set):
    """A linear model on 32 px pixels gets well above chance but far from perfect (0.78-0.85 at seeds 0-2)."""
    x, y = learn_set
    x = x.reshape(len(x), -1)
    half = len(x) // 2
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-3
    clf = LogisticRegression(C=0.01, max_iter=2000).fit((x[:half] - mean) / std, y[:half])
    auc = roc_auc_score(y[half:], clf.predict_proba((x[half:] - mean) / std)[:, 1])
    assert 0.65 < auc < 0.97, auc


def test_shenzhen_layout(tmp_path):
    root = synthesize(tmp_path, 10, size=64, seed=1, layout="shenzhen")
    files = sorted((root / "CXR_png").iterdir())
    assert [f.name[:-6] for f in files] == [f"CHNCXR_{i:04d}" for i in range(1, 11)]
    labels = [int(f.stem[-1]) for f in files]
    assert set(labels) == {0, 1} and sum(labels) == 5
    with Image.open(files[0]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (64, 64))


def test_tb_opacities_brighten_the_upper_zones(tmp_path):
    root = synthesize(tmp_path, 60, size=64, seed=0, layout="shenzhen")
    files = sorted((root / "CXR_png").iterdir())
    y = np.array([int(f.stem[-1]) for f in files])
    upper = np.array([np.asarray(Image.open(f), dtype=np.float32)[14:30, 8:56].mean() for f in files])
    assert roc_auc_score(y, upper) > 0.62


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n=0"),
        ({"n": 5, "layout": "nih"}, "layout 'nih'"),
        ({"n": 5, "size": 8}, "size=8"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        synthesize(tmp_path, **kwargs)


def test_write_example(tmp_path):
    path = write_example(tmp_path / "docs" / "example.png", size=128)
    with Image.open(path) as im:
        assert (im.mode, im.size) == ("L", (128, 128))
    assert path.stat().st_size < 100_000
