"""Patient-level splits, nested label-fraction draws, and the manifests that record them.

Chest X-ray datasets hold several images per patient; splitting by image leaks a patient's anatomy
from train into test. Every function here therefore decides at the patient level and only then
maps the decision back to image rows.

Rules, in one place:

* Stratification is on one task column, at the patient level: a patient is *positive* when any of
  its images holds 1.0; everything else (0.0, NaN unknown, -1.0 uncertain) counts as the rest. The
  split and the draw are made separately inside each of the two strata.
* Randomness comes only from ``numpy.random.default_rng`` seeded by a ``SeedSequence`` built from
  the explicit ``seed`` (and ``draw`` for draws). Patients are ordered by id before the random keys
  are drawn, so the result does not depend on the row order of the table.
* :func:`split_patients` sizes val and test as fractions of *patients* per stratum; the test
  patients are taken first, so changing ``val`` never changes the test set.
* :func:`draw_fraction` draws about ``fraction`` of the train *images*, whole patients at a time:
  inside each stratum patients are taken in one seeded permutation until the stratum's count
  reaches ``max(1, round(fraction * n))`` (round half up), where the count is of *positive images*
  in the positive stratum and of *images* in the rest (``n`` = that count over the stratum in the
  train set). Counting positives where they live holds the number of positive labels, the scarce
  thing a label-fraction experiment varies, to the fraction (on NIH Pneumonia at 10 %: 102.5 +- 1.1
  positives against 103.9 +- 10.5 when counting images), while the draw's size stays within a
  couple of percent of ``fraction * len(train)``. The ``max(1, ...)`` keeps at least one patient
  of each stratum in very small draws. The permutation depends on ``(seed, draw)`` only, never
  on ``fraction``, so for one ``(seed, draw)`` a smaller fraction is always a subset of a larger
  one (0.1 % within 1 % within 10 % within 100 %).
* A :class:`Manifest` records what a split or draw contains (sorted image and patient ids, seed,
  fraction, draw) with a SHA-256 over a canonical JSON of those fields, so a run logged to MLflow
  can be rebuilt and checked later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mococxr.errors import DataError

__all__ = [
    "Manifest",
    "check_disjoint",
    "draw_fraction",
    "make_manifest",
    "percent",
    "split_patients",
]

# SeedSequence spawn keys keep the split stream and the draw streams of one seed independent.
_SPLIT_STREAM = 0
_DRAW_STREAM = 1


# ---------------------------------------------------------------------------------------------
# validation and patient-level bookkeeping


def _check_records(
    records: pd.DataFrame, what: str, columns: tuple[str, ...] = (), *, allow_empty: bool = False
) -> None:
    if not isinstance(records, pd.DataFrame):
        raise DataError(f"{what}: expected a records DataFrame, got {type(records).__name__}")
    needed = ("image_id", "patient_id", *columns)
    missing = [c for c in needed if c not in records.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; columns present: {list(records.columns)}")
    if len(records) == 0 and not allow_empty:
        raise DataError(f"{what}: the records table is empty")
    bad = records["patient_id"].isna() | (records["patient_id"].astype(str) == "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{what}: row {row} (image_id {records['image_id'].iloc[row]!r}), field patient_id: "
            f"expected a non-empty patient id, got {records['patient_id'].iloc[row]!r}"
        )


def _check_seed(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _positive_mask(records: pd.DataFrame, task: str, what: str) -> np.ndarray:
    """True where an image's label is exactly 1.0; NaN and -1.0 (uncertain) count as not positive."""
    try:
        values = pd.to_numeric(records[task]).to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: field {task!r} must hold numbers (1.0, 0.0, -1.0 or NaN): {exc}") from exc
    return values == 1.0


def _patients(records: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(codes per row, sorted unique patient ids): codes index into the sorted ids."""
    codes, uniques = pd.factorize(records["patient_id"].astype(str), sort=True)
    return codes, np.asarray(uniques, dtype=object)


def _patient_strata(codes: np.ndarray, n_patients: int, positive: np.ndarray | None) -> np.ndarray:
    """1 for a patient with any positive image, else 0 (all zeros when not stratified)."""
    if positive is None:
        return np.zeros(n_patients, dtype=np.int64)
    return (np.bincount(codes, weights=positive, minlength=n_patients) > 0).astype(np.int64)


def _stratum_order(keys: np.ndarray, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patients sorted by (stratum, random key), and each one's rank inside its own stratum."""
    order = np.lexsort((keys, strata))
    sorted_strata = strata[order]
    starts = np.searchsorted(sorted_strata, sorted_strata, side="left")
    return order, np.arange(len(order)) - starts


def _round_half_up(x: np.ndarray | float) -> np.ndarray:
    """Round half up, with a tolerance so 0.15 * 10 (= 1.4999999999999998) still rounds to 2."""
    return np.floor(np.asarray(x, dtype=float) + 0.5 + 1e-9).astype(np.int64)


def _rows(records: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    return records.loc[mask].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# splits


def _check_split_sizes(val: float, test: float | None, test_records: pd.DataFrame | None, what: str) -> float:
    """``test`` as used (0.0 beside ``test_records``, 0.2 by default); DataError for sizes that cannot be."""
    if test_records is not None:
        _check_records(test_records, f"{what} test_records")
        if test not in (None, 0, 0.0):
            raise DataError(
                f"{what}: give either test={test} or test_records, not both; the test split is "
                f"test_records ({len(test_records)} images) when it is given"
            )
        test = 0.0
    elif test is None:
        test = 0.2
    for name, value in (("val", val), ("test", test)):
        if not 0.0 <= float(value) < 1.0:
            raise DataError(f"{what}: {name} must be a fraction in [0, 1), got {value!r}")
    if val + test >= 1.0:
        raise DataError(f"{what}: val + test = {val + test:g} leaves no patient for train")
    return test


def split_patients(
    records: pd.DataFrame,
    *,
    val: float = 0.1,
    test: float | None = None,
    seed: int = 0,
    stratify: str | None = None,
    test_records: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """Split records into ``{"train", "val", "test"}`` so that no patient is in two splits.

    ``val`` and ``test`` are fractions of patients (per stratum when ``stratify`` names a task
    column): ``round(test * n)`` patients of each stratum go to test, the next ``round(val * n)``
    of the same seeded permutation to val, the rest to train. Test is carved first, so the test
    set of a seed stays the same whatever ``val`` is.

    ``test`` defaults to 0.2. To evaluate on a fixed, official test set (e.g. CheXpert's
    ``valid.csv`` records), pass it as ``test_records``: it is returned as the test split
    unchanged, every patient it contains is removed from ``records`` (so none leaks into train
    or val), and ``records`` is split into train and val only; ``test`` must then be left out or
    0.0. Returned frames keep the input rows' order and get a fresh index.
    """
    what = "split_patients"
    _check_records(records, what, (stratify,) if stratify else ())
    seed = _check_seed(seed, "seed")
    test = _check_split_sizes(val, test, test_records, what)

    pool = records
    if test_records is not None:
        held_out = set(test_records["patient_id"].astype(str))
        pool = records.loc[~records["patient_id"].astype(str).isin(held_out).to_numpy()]
        if len(pool) == 0:
            raise DataError(f"{what}: every patient of records is also in test_records")

    codes, ids = _patients(pool)
    positive = _positive_mask(pool, stratify, what) if stratify else None
    strata = _patient_strata(codes, len(ids), positive)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM, 0)))
    order, rank = _stratum_order(rng.random(len(ids)), strata)

    stratum_size = np.bincount(strata, minlength=2)
    n_test = _round_half_up(test * stratum_size)
    n_val = _round_half_up(val * stratum_size)
    s = strata[order]
    assignment = np.empty(len(ids), dtype=np.int64)  # 0 train, 1 val, 2 test
    assignment[order] = np.where(rank < n_test[s], 2, np.where(rank < n_test[s] + n_val[s], 1, 0))
    row_split = assignment[codes]

    splits = {
        "train": _rows(pool, row_split == 0),
        "val": _rows(pool, row_split == 1),
        "test": _rows(pool, row_split == 2) if test_records is None else test_records.reset_index(drop=True),
    }
    for name, fraction in (("train", 1.0), ("val", val), ("test", test)):
        if fraction > 0 and len(splits[name]) == 0:
            raise DataError(
                f"{what}: {name} is empty: {len(ids)} patients are too few for {name}={fraction:g}"
            )
    return splits


def check_disjoint(splits: Mapping[str, pd.DataFrame]) -> None:
    """Raise DataError when any patient id appears in two of the given splits."""
    seen: dict[str, str] = {}
    for name, frame in splits.items():
        for patient in pd.unique(frame["patient_id"].astype(str)):
            other = seen.setdefault(patient, name)
            if other != name:
                raise DataError(f"patient {patient!r} is in both the {other!r} and {name!r} splits")


# ---------------------------------------------------------------------------------------------
# label-fraction draws


def percent(fraction: float) -> str:
    """A label fraction as tables, captions and run names print it: 0.001 -> '0.1%', 1.0 -> '100%'."""
    return f"{round(100 * fraction, 6):g}%"


def draw_fraction(
    train: pd.DataFrame,
    fraction: float,
    *,
    draw: int,
    seed: int,
    task: str | None,
) -> pd.DataFrame:
    """Draw about ``fraction`` of the train images, whole patients at a time, stratified on ``task``.

    Per stratum (patients with any ``task == 1.0`` image, and the rest) patients are taken in the
    order of one permutation seeded by ``(seed, draw)`` until the stratum's count reaches
    ``max(1, round(fraction * total))``; the count is of positive images in the positive stratum
    and of images in the rest (see the module docstring for why). Because the permutation ignores
    ``fraction``, draws of one ``(seed, draw)`` are nested; different ``draw`` values give
    independent draws. ``fraction=1.0`` returns the whole train set. Rows keep the train set's
    order and get a fresh index.

    With ``task`` given, a draw without at least one positive (1.0) and one negative (0.0) image
    cannot train or score a classifier and raises DataError. ``task=None`` draws unstratified and
    skips that check (e.g. for unlabeled pretraining subsets).
    """
    what = "draw_fraction"
    _check_records(train, what, (task,) if task else ())
    seed = _check_seed(seed, "seed")
    draw = _check_seed(draw, "draw")
    if not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"{what}: fraction must be in (0, 1], got {fraction!r}")

    if fraction == 1.0:
        selected = train.reset_index(drop=True)
    else:
        codes, ids = _patients(train)
        positive = _positive_mask(train, task, what) if task else None
        strata = _patient_strata(codes, len(ids), positive)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DRAW_STREAM, draw)))
        order, _ = _stratum_order(rng.random(len(ids)), strata)

        # what each patient counts towards its stratum's quota: positive images in the positive
        # stratum (so the number of positives is what is held to the fraction), images elsewhere
        counted = np.bincount(codes, weights=positive if task else None, minlength=len(ids))
        counted = np.where(strata == 1, counted, np.bincount(codes, minlength=len(ids)))[order]
        s = strata[order]
        cumulative = np.cumsum(counted)
        stratum_start = np.searchsorted(s, s, side="left")
        before = cumulative - counted - np.concatenate(([0], cumulative))[stratum_start]
        target = np.maximum(1, _round_half_up(fraction * np.bincount(s, weights=counted, minlength=2)))
        chosen = np.zeros(len(ids), dtype=bool)
        chosen[order] = before < target[s]
        selected = _rows(train, chosen[codes])

    if task:
        _check_both_classes(selected, train, task, f"{what}: fraction={fraction:g}, draw={draw}, seed={seed}")
    return selected


def _check_both_classes(selected: pd.DataFrame, train: pd.DataFrame, task: str, what: str) -> None:
    """A draw without a positive and a negative image can neither train nor score a classifier."""
    labels = pd.to_numeric(selected[task]).to_numpy(dtype=float, na_value=np.nan)
    n_pos, n_neg = int((labels == 1.0).sum()), int((labels == 0.0).sum())
    if n_pos == 0 or n_neg == 0:
        available = _positive_mask(train, task, what)
        raise DataError(
            f"{what} on task {task!r} gives "
            f"{n_pos} positive and {n_neg} negative images; a draw needs at least one of each. "
            f"The train set has {int(available.sum())} positive images "
            f"({train.loc[available, 'patient_id'].nunique()} patients) and "
            f"{int((pd.to_numeric(train[task]) == 0.0).sum())} negative images."
        )


# ---------------------------------------------------------------------------------------------
# manifests


def _canonical_json(
    name: str, image_ids: list[str], patient_ids: list[str], seed: int, fraction: float, draw: int
) -> bytes:
    content = {
        "name": name,
        "image_ids": image_ids,
        "patient_ids": patient_ids,
        "seed": seed,
        "fraction": fraction,
        "draw": draw,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Manifest:
    """What one split or draw contains, with a SHA-256 that any change to its content breaks.

    The hash covers every field but itself, serialised as sorted-key, compact, ASCII JSON; it is
    logged as the ``mococxr.manifest_sha256`` tag so a table can name exactly what it was trained
    and tested on. Build one with :func:`make_manifest`; constructing it with a hash that does not
    match the content raises DataError.
    """

    name: str
    image_ids: list[str]
    patient_ids: list[str]
    seed: int
    fraction: float
    draw: int
    sha256: str

    def __post_init__(self) -> None:
        expected = self.content_hash()
        if self.sha256 != expected:
            raise DataError(
                f"manifest {self.name!r}: sha256 {self.sha256!r} does not match its content "
                f"({expected}); it was edited or corrupted"
            )

    def content_hash(self) -> str:
        """The SHA-256 hex digest of the canonical JSON of every field except ``sha256``."""
        payload = _canonical_json(
            self.name, list(self.image_ids), list(self.patient_ids), self.seed, self.fraction, self.draw
        )
        return hashlib.sha256(payload).hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        """Write the manifest as JSON (one id per line, diff-friendly) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def _read(cls, path: str | Path) -> Manifest:
        """Read a manifest written by :meth:`write`; DataError if it is malformed or tampered with."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: manifest file not found") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable JSON manifest: {exc}") from exc
        fields = {
            "name": str,
            "image_ids": list,
            "patient_ids": list,
            "seed": int,
            "fraction": (int, float),
            "draw": int,
            "sha256": str,
        }
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object with fields {sorted(fields)}")
        for field, kind in fields.items():
            if field not in data:
                raise DataError(f"{path}: field {field!r} is missing")
            if not isinstance(data[field], kind) or isinstance(data[field], bool):
                raise DataError(f"{path}: field {field!r} has the wrong type {type(data[field]).__name__}")
        try:
            return cls(**{**{f: data[f] for f in fields}, "fraction": float(data["fraction"])})
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc

    def _select(self, records: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``records`` this manifest names, in the table's order; DataError if any is absent."""
        _check_records(records, f"manifest {self.name!r}")
        mask = records["image_id"].isin(self.image_ids).to_numpy()
        if int(mask.sum()) != len(self.image_ids):
            missing = sorted(set(self.image_ids) - set(records["image_id"]))
            raise DataError(
                f"manifest {self.name!r}: {len(missing)} image ids are not in the records table, "
                f"e.g. {missing[:3]}"
            )
        return _rows(records, mask)


def make_manifest(
    name: str, records: pd.DataFrame, *, seed: int, fraction: float = 1.0, draw: int = 0
) -> Manifest:
    """Record ``records`` (a split or a draw) with the seed, fraction and draw that produced it."""
    what = f"manifest {name!r}"
    _check_records(records, what, allow_empty=True)
    duplicated = records["image_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{what}: row {row}, field image_id: {records['image_id'].iloc[row]!r} is duplicated")
    image_ids = sorted(records["image_id"].astype(str))
    patient_ids = sorted(pd.unique(records["patient_id"].astype(str)))
    seed, draw, fraction = _check_seed(seed, "seed"), _check_seed(draw, "draw"), float(fraction)
    digest = hashlib.sha256(_canonical_json(name, image_ids, patient_ids, seed, fraction, draw)).hexdigest()
    return Manifest(name, image_ids, patient_ids, seed, fraction, draw, digest)


def _split_manifests(
    splits: Mapping[str, pd.DataFrame], *, seed: int, prefix: str = ""
) -> dict[str, Manifest]:
    """One manifest per split, named ``f"{prefix}{split}"`` (fraction 1.0, draw 0)."""
    return {split: make_manifest(f"{prefix}{split}", frame, seed=seed) for split, frame in splits.items()}
