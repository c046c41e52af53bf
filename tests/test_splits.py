"""Patient-level splits, nested label-fraction draws and manifests (mococxr.data.splits)."""

from __future__ import annotations

import inspect
import json
import time

import numpy as np
import pandas as pd
import pytest

from mococxr.data.splits import (
    Manifest,
    _split_manifests,
    check_disjoint,
    draw_fraction,
    make_manifest,
    split_patients,
)
from mococxr.errors import DataError

TASK = "Effusion"


def make_records(n_patients: int = 2000, prevalence: float = 0.15, seed: int = 0) -> pd.DataFrame:
    """1-8 images per patient; a positive patient has a 1.0 on some images, others 0.0/NaN/-1.0."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, size=n_patients)
    patient = np.repeat(np.arange(n_patients), counts)
    follow_up = np.concatenate([np.arange(c) for c in counts])
    positive_patient = rng.random(n_patients) < prevalence
    labels = rng.choice([0.0, 0.0, 0.0, np.nan, -1.0], size=len(patient))
    hit = positive_patient[patient] & (rng.random(len(patient)) < 0.6)
    first_image = follow_up == 0
    labels[hit | (positive_patient[patient] & first_image)] = 1.0
    return pd.DataFrame(
        {
            "image_id": [f"{p:08d}_{f:03d}.png" for p, f in zip(patient, follow_up, strict=True)],
            "patient_id": [f"p{p:05d}" for p in patient],
            TASK: labels,
        }
    )


def in_positive_patient(frame: pd.DataFrame, task: str) -> pd.Series:
    """Per image: does its patient have any positive image?"""
    return (frame[task] == 1.0).groupby(frame["patient_id"]).transform("any")


def patient_positive_rate(frame: pd.DataFrame) -> float:
    return float((frame[TASK] == 1.0).groupby(frame["patient_id"]).any().mean())


def stratum_image_share(frame: pd.DataFrame) -> float:
    """Share of images belonging to patients with any positive image (what a draw stratifies)."""
    return float(in_positive_patient(frame, TASK).mean())


def ids(frame: pd.DataFrame) -> set[str]:
    return set(frame["image_id"])


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return make_records()


# --------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("stratify", [None, TASK])
def test_split_has_no_patient_overlap_and_covers_all_rows(records, stratify):
    splits = split_patients(records, val=0.1, test=0.2, seed=3, stratify=stratify)
    assert set(splits) == {"train", "val", "test"}
    check_disjoint(splits)
    patients = [set(splits[k]["patient_id"]) for k in ("train", "val", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert sum(len(f) for f in splits.values()) == len(records)
    assert ids(splits["train"]) | ids(splits["val"]) | ids(splits["test"]) == ids(records)
    n = records["patient_id"].nunique()
    assert abs(len(patients[2]) - 0.2 * n) <= 2 and abs(len(patients[1]) - 0.1 * n) <= 2


def test_split_is_reproducible_and_independent_of_row_order(records):
    first = split_patients(records, seed=7, stratify=TASK)
    again = split_patients(records, seed=7, stratify=TASK)
    shuffled = split_patients(records.sample(frac=1.0, random_state=1), seed=7, stratify=TASK)
    for name in ("train", "val", "test"):
        assert first[name]["image_id"].tolist() == again[name]["image_id"].tolist()
        assert ids(first[name]) == ids(shuffled[name])
    assert list(first["train"].index) == list(range(len(first["train"])))


def test_different_seeds_give_different_splits(records):
    a = split_patients(records, seed=0)
    b = split_patients(records, seed=1)
    assert ids(a["test"]) != ids(b["test"])
    overlap = len(set(a["test"]["patient_id"]) & set(b["test"]["patient_id"]))
    assert overlap < 0.5 * a["test"]["patient_id"].nunique()


def test_stratified_split_keeps_positive_rate(records):
    overall = patient_positive_rate(records)
    for seed in range(3):
        splits = split_patients(records, val=0.1, test=0.2, seed=seed, stratify=TASK)
        for name, frame in splits.items():
            # per-stratum rounding: off by at most one patient per stratum
            assert abs(patient_positive_rate(frame) - overall) < 0.01, (seed, name)


def test_test_set_does_not_depend_on_val(records):
    a = split_patients(records, val=0.1, test=0.2, seed=5, stratify=TASK)
    b = split_patients(records, val=0.3, test=0.2, seed=5, stratify=TASK)
    assert ids(a["test"]) == ids(b["test"])


def test_given_test_records_are_removed_from_train_and_val(records):
    official = records[records["patient_id"].isin([f"p{i:05d}" for i in range(0, 2000, 10)])]
    splits = split_patients(records, val=0.2, seed=0, stratify=TASK, test_records=official)
    assert ids(splits["test"]) == ids(official)
    check_disjoint(splits)
    assert len(splits["train"]) + len(splits["val"]) == len(records) - len(official)
    with pytest.raises(DataError, match="test_records"):
        split_patients(records, test=0.2, test_records=official)
    assert ids(split_patients(records, test=0.0, test_records=official)["test"]) == ids(official)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val": 0.5, "test": 0.5}, "no patient for train"),
        ({"test": -0.1}, "test must be a fraction"),
        ({"stratify": "Nope"}, "Nope"),
        ({"seed": -1}, "seed"),
    ],
)
def test_split_rejects_bad_arguments(records, kwargs, message):
    with pytest.raises(DataError, match=message):
        split_patients(records, **kwargs)


def test_split_rejects_missing_patient_id(records):
    broken = records.drop(columns="patient_id")
    with pytest.raises(DataError, match="patient_id"):
        split_patients(broken)
    blank = records.copy()
    blank.loc[5, "patient_id"] = None
    with pytest.raises(DataError, match="row 5"):
        split_patients(blank)


def test_check_disjoint_detects_a_shared_patient(records):
    splits = split_patients(records, seed=0)
    leaked = dict(splits, test=pd.concat([splits["test"], splits["train"].iloc[:1]]))
    with pytest.raises(DataError, match="in both"):
        check_disjoint(leaked)


# --------------------------------------------------------------------------------- draws


@pytest.fixture(scope="module")
def train(records) -> pd.DataFrame:
    return split_patients(records, seed=0, stratify=TASK)["train"]


@pytest.mark.parametrize("draw", range(4))
def test_draws_are_nested_and_whole_patients(train, draw):
    fractions = (0.01, 0.1, 0.5, 1.0)
    frames = [draw_fraction(train, f, draw=draw, seed=11, task=TASK) for f in fractions]
    for small, large in zip(frames, frames[1:], strict=False):
        assert ids(small) < ids(large)
    assert ids(frames[-1]) == ids(train)
    per_patient = train.groupby("patient_id").size()
    for fraction, frame in zip(fractions, frames, strict=True):
        got = frame.groupby("patient_id").size()
        assert (got == per_patient[got.index]).all(), "a patient was split between drawn and not drawn"
        assert_quota_rule(train, frame, fraction)


def quota_counts(frame: pd.DataFrame) -> tuple[int, int]:
    """(positive images of positive patients, images of the other patients): what a draw counts."""
    return int((frame[TASK] == 1.0).sum()), int((~in_positive_patient(frame, TASK)).sum())


def assert_quota_rule(train: pd.DataFrame, frame: pd.DataFrame, fraction: float, max_per_patient: int = 8):
    """Each stratum's count reaches max(1, round(fraction * total)) and overshoots by less than a patient."""
    for total, got in zip(quota_counts(train), quota_counts(frame), strict=True):
        target = max(1, int(np.floor(fraction * total + 0.5)))
        assert target <= got <= target + max_per_patient - 1, (fraction, total, got)


def test_draws_are_reproducible_and_differ_across_draws_and_seeds(train):
    a = draw_fraction(train, 0.1, draw=0, seed=0, task=TASK)
    assert a["image_id"].tolist() == draw_fraction(train, 0.1, draw=0, seed=0, task=TASK)["image_id"].tolist()
    shuffled = train.sample(frac=1.0, random_state=3)
    assert ids(a) == ids(draw_fraction(shuffled, 0.1, draw=0, seed=0, task=TASK))
    others = [draw_fraction(train, 0.1, draw=d, seed=0, task=TASK) for d in (1, 2)]
    others.append(draw_fraction(train, 0.1, draw=0, seed=1, task=TASK))
    for other in others:
        assert ids(other) != ids(a)
        assert len(ids(other) & ids(a)) < 0.5 * len(ids(a))


def test_draws_are_stratified(train):
    share = stratum_image_share(train)
    rate = float((train[TASK] == 1.0).mean())
    for draw in range(3):
        for fraction in (0.05, 0.2):
            frame = draw_fraction(train, fraction, draw=draw, seed=0, task=TASK)
            assert abs(stratum_image_share(frame) - share) < 0.03, (draw, fraction)
            assert abs(float((frame[TASK] == 1.0).mean()) - rate) < 0.15 * rate, (draw, fraction)
            assert abs(len(frame) - fraction * len(train)) < 0.1 * fraction * len(train) + 8


@pytest.mark.parametrize(
    ("fraction", "positives", "negatives"), [(0.1, 10, 90), (0.25, 25, 225), (0.001, 1, 1)]
)
def test_quota_is_exact_with_one_image_per_patient(fraction, positives, negatives):
    frame = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(1000)],
            "patient_id": [f"p{i}" for i in range(1000)],
            TASK: np.r_[np.ones(100), np.zeros(900)],
        }
    )
    drawn = draw_fraction(frame, fraction, draw=0, seed=0, task=TASK)
    assert ((drawn[TASK] == 1.0).sum(), (drawn[TASK] == 0.0).sum()) == (positives, negatives)


def test_tiny_draw_still_has_both_classes(train):
    frame = draw_fraction(train, 0.0005, draw=0, seed=0, task=TASK)
    assert (frame[TASK] == 1.0).any() and (frame[TASK] == 0.0).any()


def test_single_class_draw_raises(train):
    no_positives = train.assign(**{TASK: train[TASK].where(train[TASK] != 1.0, 0.0)})
    with pytest.raises(DataError, match=r"fraction=0.1, draw=2.*0 positive images"):
        draw_fraction(no_positives, 0.1, draw=2, seed=0, task=TASK)
    # uncertain (-1) and unknown (NaN) are neither positive nor negative
    no_negatives = train.assign(**{TASK: train[TASK].where(train[TASK] != 0.0, -1.0)})
    with pytest.raises(DataError, match="0 negative"):
        draw_fraction(no_negatives, 0.5, draw=0, seed=0, task=TASK)


def test_uncertain_counts_as_rest_for_stratification():
    frame = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(6)],
            "patient_id": ["a", "a", "b", "c", "d", "e"],
            TASK: [-1.0, 0.0, 1.0, np.nan, -1.0, 0.0],
        }
    )
    # one positive patient (b) of five: with test=0.2 per stratum, only "rest" patients go to test
    splits = split_patients(frame, val=0.0, test=0.2, seed=0, stratify=TASK)
    assert "b" in set(splits["train"]["patient_id"])
    assert splits["test"]["patient_id"].nunique() == 1


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_draw_rejects_bad_fraction(train, fraction):
    with pytest.raises(DataError, match="fraction"):
        draw_fraction(train, fraction, draw=0, seed=0, task=TASK)


def test_unstratified_draw(train):
    frame = draw_fraction(train, 0.1, draw=0, seed=0, task=None)
    assert ids(frame) < ids(draw_fraction(train, 0.3, draw=0, seed=0, task=None))
    assert abs(len(frame) - 0.1 * len(train)) <= 8


# --------------------------------------------------------------------------------- manifests


def test_manifest_hash_is_stable_and_sensitive(train, tmp_path):
    frame = draw_fraction(train, 0.1, draw=1, seed=4, task=TASK)
    m = make_manifest("effusion-0.1-draw1", frame, seed=4, fraction=0.1, draw=1)
    assert m.image_ids == sorted(frame["image_id"]) and m.patient_ids == sorted(set(frame["patient_id"]))
    again = make_manifest("effusion-0.1-draw1", frame.iloc[::-1], seed=4, fraction=0.1, draw=1)
    assert again.sha256 == m.sha256 and len(m.sha256) == 64
    assert (
        make_manifest("effusion-0.1-draw1", frame.iloc[1:], seed=4, fraction=0.1, draw=1).sha256 != m.sha256
    )
    assert make_manifest("effusion-0.1-draw1", frame, seed=5, fraction=0.1, draw=1).sha256 != m.sha256

    path = m.write(tmp_path / "sub" / "manifest.json")
    read = Manifest._read(path)
    assert read == m and read.to_dict() == m.to_dict()
    assert m._select(train)["image_id"].tolist() == sorted(
        frame["image_id"], key=list(train["image_id"]).index
    )


def test_manifest_tampering_is_detected(train, tmp_path):
    m = make_manifest("train", train, seed=0)
    path = m.write(tmp_path / "m.json")
    data = json.loads(path.read_text())
    data["image_ids"][0] = "99999999_000.png"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="does not match"):
        Manifest._read(path)
    del data["seed"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="seed"):
        Manifest._read(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="m.json"):
        Manifest._read(path)
    with pytest.raises(DataError, match="not found"):
        Manifest._read(tmp_path / "missing.json")


def test_manifest_rejects_duplicates_and_missing_images(train):
    with pytest.raises(DataError, match="duplicated"):
        make_manifest("dup", pd.concat([train, train.iloc[:1]]), seed=0)
    m = make_manifest("train", train, seed=0)
    with pytest.raises(DataError, match="not in the records"):
        m._select(train.iloc[1:])


def test_split_manifests(records):
    splits = split_patients(records, seed=2, stratify=TASK)
    manifests = _split_manifests(splits, seed=2, prefix="nih-")
    assert {k: m.name for k, m in manifests.items()} == {
        "train": "nih-train",
        "val": "nih-val",
        "test": "nih-test",
    }
    assert len({m.sha256 for m in manifests.values()}) == 3
    assert sum(len(m.image_ids) for m in manifests.values()) == len(records)


# --------------------------------------------------------------------------------- real data


def read_full_nih_table(root) -> pd.DataFrame:
    """The full 112,120-row NIH table as records (via read_nih when present, else pandas directly)."""
    csv = root / "Data_Entry_2017_v2020.csv.gz"
    try:
        from mococxr.data.records import read_nih
    except ImportError:
        read_nih = None
    if read_nih is not None:
        params = inspect.signature(read_nih).parameters
        flag = next((p for p in ("require_images", "verify_images") if p in params), None)
        table = read_nih(root, csv, **({flag: False} if flag else {}))
        if "Pneumonia" in table.columns:
            return table
    raw = pd.read_csv(csv, usecols=[0, 1, 3], dtype=str)
    return pd.DataFrame(
        {
            "image_id": raw["Image Index"],
            "patient_id": raw["Patient ID"],
            "Pneumonia": raw["Finding Labels"].str.split("|").apply(lambda f: "Pneumonia" in f).astype(float),
        }
    )


@pytest.mark.realdata
def test_full_nih_table_splits_and_nested_draws(nih_sample):
    table = read_full_nih_table(nih_sample)
    assert len(table) == 112_120 and table["patient_id"].nunique() == 30_805

    start = time.perf_counter()
    splits = split_patients(table, val=0.1, test=0.2, seed=0, stratify="Pneumonia")
    split_s = time.perf_counter() - start
    check_disjoint(splits)
    assert sum(len(f) for f in splits.values()) == len(table)
    train = splits["train"]
    train_rate = float((train["Pneumonia"] == 1.0).mean())
    train_share = float(in_positive_patient(train, "Pneumonia").mean())
    print(
        f"\nsplit of {len(table)} rows: {split_s:.3f} s; train {len(train)} images, "
        f"pneumonia rate {train_rate:.4f}, positive-patient image share {train_share:.4f}"
    )

    n_train_pos = int((train["Pneumonia"] == 1.0).sum())
    max_pos_per_patient = int((train["Pneumonia"] == 1.0).groupby(train["patient_id"]).sum().max())
    timings = []
    for draw in range(3):
        frames = {}
        for fraction in (0.001, 0.01, 0.1):
            start = time.perf_counter()
            frames[fraction] = draw_fraction(train, fraction, draw=draw, seed=0, task="Pneumonia")
            timings.append(time.perf_counter() - start)
            frame = frames[fraction]
            rate = float((frame["Pneumonia"] == 1.0).mean())
            share = float(in_positive_patient(frame, "Pneumonia").mean())
            print(
                f"draw {draw} fraction {fraction}: {len(frame)} images, "
                f"{int((frame['Pneumonia'] == 1.0).sum())} positive, rate {rate:.4f}, share {share:.4f}"
            )
            n_pos = int((frame["Pneumonia"] == 1.0).sum())
            # positives are held to the fraction: reach the quota, overshoot by less than one patient
            target = max(1, round(fraction * n_train_pos))
            assert target <= n_pos < target + max_pos_per_patient
            assert abs(len(frame) - fraction * len(train)) <= 0.1 * fraction * len(train) + 100
            if fraction >= 0.01:
                # ~10 positives at 1 %: one patient with several pneumonia images moves the rate a lot
                assert abs(rate - train_rate) < (0.5 if fraction < 0.1 else 0.15) * train_rate
        assert ids(frames[0.001]) < ids(frames[0.01]) < ids(frames[0.1])
    print(f"draw_fraction on {len(train)} rows: max {max(timings):.3f} s, mean {np.mean(timings):.3f} s")
    assert max(timings) < 5.0
