"""Paired bootstrap: exact agreement with scikit-learn on the same resamples, pairing, patients, draws."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, roc_auc_score

from mococxr.errors import DataError
from mococxr.report.bootstrap import (
    auc_replicates,
    auprc_replicates,
    bootstrap_counts,
    indices_to_counts,
    paired_bootstrap,
)

TOL = 1e-12


def _scores(kind: str, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = rng.random(y.size) + 0.4 * y
    if kind == "round1":  # heavy ties, within and across classes
        return np.round(s, 1)
    if kind == "all_tied":
        return np.full(y.size, 0.5)
    return s


def _sklearn_replicates(y, s, counts, rows):
    """The reference: materialise each resample and call sklearn on it (NaN where it is undefined)."""
    auc, ap = [], []
    for r in rows:
        idx = np.repeat(np.arange(y.size), counts[r])
        yr, sr = y[idx], s[idx]
        single = yr.all() or not yr.any()
        auc.append(np.nan if single else roc_auc_score(yr, sr))
        ap.append(np.nan if single else average_precision_score(yr, sr))
    return np.array(auc), np.array(ap)


def test_toy_case_by_hand():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    ones = np.ones((1, 4), dtype=np.int32)
    # 4 positive-negative pairs, 3 ordered correctly; AP: recall 1/2 at precision 1, then 1 at 2/3
    assert auc_replicates(y, s, ones)[0] == pytest.approx(0.75, abs=TOL)
    assert auprc_replicates(y, s, ones)[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=TOL)

    counts = indices_to_counts([[0, 2, 3, 3], [1, 1, 2, 0], [0, 0, 1, 1]], 4)
    np.testing.assert_array_equal(counts, [[1, 0, 1, 2], [1, 2, 1, 0], [2, 2, 0, 0]])
    # rep 0: one negative (0.1) below three positives -> perfect ranking
    # rep 1: negatives 0.4, 0.4, 0.1 vs one positive 0.35: beats 1 of 3; AP: precision 1/3 at recall 1
    # rep 2: negatives only -> undefined
    np.testing.assert_allclose(auc_replicates(y, s, counts), [1.0, 1 / 3, np.nan], atol=TOL)
    np.testing.assert_allclose(auprc_replicates(y, s, counts), [1.0, 1 / 3, np.nan], atol=TOL)


def test_tie_between_classes_counts_one_half():
    y, s = np.array([0, 1]), np.array([0.5, 0.5])
    counts = indices_to_counts([[0, 1], [0, 1, 1, 1]], 2)  # rows may hold any number of draws
    np.testing.assert_allclose(auc_replicates(y, s, counts), [0.5, 0.5], atol=TOL)
    np.testing.assert_allclose(auprc_replicates(y, s, counts), [0.5, 0.75], atol=TOL)


@pytest.mark.parametrize("kind", ["float", "round1", "all_tied"])
@pytest.mark.parametrize(("n", "n_checked"), [(234, 120), (2000, 30), (20000, 8)])
def test_equals_sklearn_on_the_same_resamples(n, n_checked, kind):
    rng = np.random.default_rng(n)
    y = rng.random(n) < 0.3
    s = _scores(kind, y, rng)
    counts = bootstrap_counts(n, 500, seed=1)
    auc, ap = auc_replicates(y, s, counts), auprc_replicates(y, s, counts)
    assert auc.shape == ap.shape == (500,)
    rows = np.linspace(0, 499, n_checked).astype(int)
    ref_auc, ref_ap = _sklearn_replicates(y, s, counts, rows)
    np.testing.assert_allclose(auc[rows], ref_auc, rtol=0, atol=TOL)
    np.testing.assert_allclose(ap[rows], ref_ap, rtol=0, atol=TOL)


def test_single_class_replicates_are_nan_and_counted():
    y = np.array([0, 0, 0, 0, 0, 1])  # one positive in six: many resamples miss it
    s = np.array([0.2, 0.9, 0.1, 0.4, 0.4, 0.6])
    counts = bootstrap_counts(6, 300, seed=3)
    missing = counts[:, 5] == 0
    assert 0 < missing.sum() < 300
    auc, ap = auc_replicates(y, s, counts), auprc_replicates(y, s, counts)
    np.testing.assert_array_equal(np.isnan(auc), missing)
    np.testing.assert_array_equal(np.isnan(ap), missing)
    idx = np.repeat(np.arange(6), counts[np.flatnonzero(missing)[0]])
    with warnings.catch_warnings():  # what the explicit rule replaces: sklearn raises or warns
        warnings.simplefilter("error")
        with pytest.raises((ValueError, UndefinedMetricWarning)):
            roc_auc_score(y[idx], s[idx])
    rows = np.flatnonzero(~missing)[:50]
    ref_auc, ref_ap = _sklearn_replicates(y, s, counts, rows)
    np.testing.assert_allclose(auc[rows], ref_auc, atol=TOL)
    np.testing.assert_allclose(ap[rows], ref_ap, atol=TOL)

    res = paired_bootstrap(y, {"m": s}, n_replicates=300, seed=3)
    assert res.n_single_class == missing.sum()
    np.testing.assert_array_equal(res.single_class, missing)
    iv = res.interval("m", "auc")
    assert (iv.lo, iv.hi) == tuple(np.percentile(auc[~missing], [2.5, 97.5]))
    assert res.summary()[0]["n_single_class"] == missing.sum()


def test_models_are_paired_on_the_same_resamples():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.random(n) < 0.4
    a = rng.random(n) + 0.5 * y
    b = rng.random(n) + 0.2 * y
    res = paired_bootstrap(y, {"a": a, "b": b, "a_rescaled": 3 * a - 1}, n_replicates=200, seed=7)
    counts = bootstrap_counts(n, 200, seed=7)
    for name, s in {"a": a, "b": b}.items():
        np.testing.assert_array_equal(res.replicates["auc"][name], auc_replicates(y, s, counts))
        np.testing.assert_array_equal(res.replicates["auprc"][name], auprc_replicates(y, s, counts))
        assert res.point["auc"][name] == pytest.approx(roc_auc_score(y, s), abs=TOL)
        assert res.point["auprc"][name] == pytest.approx(average_precision_score(y, s), abs=TOL)
    # a monotone rescaling ranks identically: on shared resamples the difference is exactly zero
    same = res.diff("a", "a_rescaled")
    assert (same.point, same.lo, same.hi, same.frac_greater) == (0.0, 0.0, 0.0, 0.0)
    d = res.diff("a", "b", "auprc")
    reps = res.replicates["auprc"]["a"] - res.replicates["auprc"]["b"]
    assert (d.lo, d.hi) == tuple(np.percentile(reps, [2.5, 97.5]))
    assert d.frac_greater == pytest.approx((reps > 0).mean())
    assert d.point == pytest.approx(average_precision_score(y, a) - average_precision_score(y, b))
    assert d.lo < d.point < d.hi and d.frac_greater > 0.9


def test_group_resampling_keeps_patients_whole():
    rng = np.random.default_rng(1)
    patients = np.repeat([f"p{i:03d}" for i in range(40)], rng.integers(1, 6, size=40))
    rng.shuffle(patients)
    counts = bootstrap_counts(patients.size, 100, seed=5, groups=patients)
    assert counts.shape == (100, patients.size)
    drawn = np.zeros((100, 40), dtype=int)
    for i, p in enumerate(np.unique(patients)):
        block = counts[:, patients == p]
        assert (block == block[:, :1]).all()  # every image of a patient shares its count
        drawn[:, i] = block[:, 0]
    assert (drawn.sum(axis=1) == 40).all()  # 40 patients drawn with replacement per replicate
    np.testing.assert_array_equal(counts, bootstrap_counts(patients.size, 100, seed=5, groups=patients))

    y = rng.random(patients.size) < 0.5
    s = rng.random(patients.size) + y
    res = paired_bootstrap(y, {"m": s}, n_replicates=100, seed=5, groups=patients)
    np.testing.assert_array_equal(res.replicates["auc"]["m"], auc_replicates(y, s, counts))
    ref_auc, ref_ap = _sklearn_replicates(y, s, counts, range(20))
    np.testing.assert_allclose(res.replicates["auc"]["m"][:20], ref_auc, atol=TOL)
    np.testing.assert_allclose(res.replicates["auprc"]["m"][:20], ref_ap, atol=TOL)


def test_draws_are_averaged_per_replicate():
    rng = np.random.default_rng(2)
    n = 200
    y = rng.random(n) < 0.3
    draws = [rng.random(n) + k * 0.3 * y for k in range(3)]
    res = paired_bootstrap(y, {"frac": draws, "frac_array": np.stack(draws)}, n_replicates=150, seed=4)
    counts = bootstrap_counts(n, 150, seed=4)
    per_draw = np.stack([auc_replicates(y, d, counts) for d in draws])
    np.testing.assert_allclose(res.replicates["auc"]["frac"], per_draw.mean(axis=0), atol=TOL)
    np.testing.assert_array_equal(res.replicates["auc"]["frac"], res.replicates["auc"]["frac_array"])
    assert res.n_draws == {"frac": 3, "frac_array": 3}
    assert res.point["auc"]["frac"] == pytest.approx(np.mean([roc_auc_score(y, d) for d in draws]), abs=TOL)
    iv = res.interval("frac")
    assert (iv.lo, iv.hi) == tuple(np.percentile(per_draw.mean(axis=0), [2.5, 97.5]))
    # percentiles of the averaged replicates, not the average of per-draw intervals
    per_draw_lo = np.mean([np.percentile(r, 2.5) for r in per_draw])
    assert iv.lo != pytest.approx(per_draw_lo, abs=1e-6)


def test_seed_reproducibility():
    a = bootstrap_counts(50, 20, seed=11)
    assert a.dtype == np.int32 and a.shape == (20, 50)
    assert (a.sum(axis=1) == 50).all()
    np.testing.assert_array_equal(a, bootstrap_counts(50, 20, seed=11))
    assert not np.array_equal(a, bootstrap_counts(50, 20, seed=12))
    y = np.arange(50) % 3 == 0
    s = np.linspace(0, 1, 50)[::-1] ** 2
    r1 = paired_bootstrap(y, {"m": s}, n_replicates=20, seed=11)
    r2 = paired_bootstrap(y, {"m": s}, n_replicates=20, seed=11, counts=a)
    np.testing.assert_array_equal(r1.replicates["auc"]["m"], r2.replicates["auc"]["m"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: auc_replicates([0, 1, np.nan], [0.1, 0.2, 0.3], np.ones((1, 3), int)), "0/1"),
        (lambda: auc_replicates([0, 1, 1], [0.1, 0.2], np.ones((1, 3), int)), "one score per label"),
        (lambda: auc_replicates([0, 1, 1], [0.1, np.inf, 0.3], np.ones((1, 3), int)), "finite"),
        (lambda: auc_replicates([0, 1, 1], [0.1, 0.2, 0.3], np.ones((1, 4), int)), "counts"),
        (lambda: paired_bootstrap([1, 1, 1], {"m": [0.1, 0.2, 0.3]}), "single class"),
        (lambda: paired_bootstrap([0, 1, 1], {"m": [0.1, 0.2, 0.3]}, metrics=("f1",)), "metrics"),
        (lambda: bootstrap_counts(3, 5, groups=["a", "b"]), "one patient id per image"),
        (lambda: indices_to_counts([[0, 3]], 3), r"\[0, 3\)"),
    ],
)
def test_bad_input_raises_data_error(call, match):
    with pytest.raises(DataError, match=match):
        call()


def test_unknown_model_or_metric_in_result():
    res = paired_bootstrap([0, 1, 0, 1], {"m": [0.1, 0.7, 0.3, 0.9]}, n_replicates=10, metrics=("auc",))
    with pytest.raises(DataError, match="unknown model"):
        res.interval("x")
    with pytest.raises(DataError, match="not computed"):
        res.diff("m", "m", "auprc")


def test_large_counts_and_any_integer_dtype():
    rng = np.random.default_rng(9)
    y = np.arange(30) % 4 == 0
    s = np.round(rng.random(30), 1)
    rows = [rng.integers(0, 30, size=40), np.r_[np.zeros(300, int), np.arange(30)], np.arange(30)]
    counts = indices_to_counts(rows, 30)  # row 1 holds image 0 301 times: needs more than uint8
    ref_auc, ref_ap = _sklearn_replicates(y, s, counts, range(3))
    for dtype in (np.int64, np.uint16, np.int32):
        np.testing.assert_allclose(auc_replicates(y, s, counts.astype(dtype)), ref_auc, atol=TOL)
        np.testing.assert_allclose(auprc_replicates(y, s, counts.astype(dtype)), ref_ap, atol=TOL)
