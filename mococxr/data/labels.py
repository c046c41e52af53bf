"""Tasks and uncertainty policies: which label columns a model predicts and what -1 and blank mean.

A records table (see :mod:`mococxr.data.records`) holds each label as 1.0, 0.0, -1.0 (uncertain) or
NaN (not mentioned). Before training, :func:`apply_policy` decides what the last two mean:

- uncertain (-1), per the CheXpert paper: "ignore" (U-Ignore, the default) -> NaN, masked out of the
  loss and the metrics; "ones" (U-Ones) -> 1; "zeros" (U-Zeros) -> 0.
- blank (NaN): "negative" (the default) -> 0, the convention of CheXpert's training file, where an
  observation the report does not mention is absent; "unknown" -> stays NaN, i.e. masked.

:func:`label_matrix` then gives the float32 target matrix, NaN marking a masked entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mococxr.config import POLICIES
from mococxr.data.records import CHEXPERT_OBSERVATIONS, NIH_FINDINGS, task_columns
from mococxr.errors import ConfigError, DataError

TASK_SETS: dict[str, list[str]] = {
    "pleural_effusion": ["Pleural Effusion"],
    # The five CheXpert competition tasks (Irvin et al. 2019).
    "competition5": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
    "all14": list(CHEXPERT_OBSERVATIONS),
    "tb": ["Tuberculosis"],
    "nih14": list(NIH_FINDINGS),
    "pneumonia": ["Pneumonia"],
    "cardiomegaly": ["Cardiomegaly"],
}
# The same finding under another dataset's column name: a task set resolves to the name the records use
# (NIH calls pleural effusion "Effusion").
SYNONYMS: dict[str, tuple[str, ...]] = {"Pleural Effusion": ("Effusion",)}
BLANKS = ("negative", "unknown")
_UNCERTAIN_TO = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}


def resolve_tasks(spec: str | Sequence[str], records: pd.DataFrame | None = None) -> list[str]:
    """Task column names from a set name (:data:`TASK_SETS`), comma-separated names, or a list.

    With ``records``, every name must be a task column of the table; a DataError names the first
    missing one and lists the columns that exist.
    """
    if isinstance(spec, str):
        names = (
            list(TASK_SETS[spec]) if spec in TASK_SETS else [t.strip() for t in spec.split(",") if t.strip()]
        )
    else:
        names = [str(t) for t in spec]
    if not names:
        raise ConfigError(f"no tasks in {spec!r} (give a set name: {', '.join(TASK_SETS)}, or column names)")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise ConfigError(f"task {repeated[0]!r} is listed twice in {spec!r}")
    if records is not None:
        available = task_columns(records)
        if isinstance(spec, str) and spec in TASK_SETS:
            names = [
                next((alt for alt in SYNONYMS.get(n, ()) if alt in available and n not in available), n)
                for n in names
            ]
        for name in names:
            if name not in available:
                raise DataError(
                    f"no label column {name!r} in the records (task {spec!r}); label columns: "
                    f"{', '.join(available) or 'none'}"
                )
    return names


def _per_task(
    value: str | Mapping[str, str], tasks: Sequence[str], allowed: Sequence[str], default: str, what: str
) -> dict[str, str]:
    """A choice per task from one value or a dict task -> value (tasks it omits get ``default``)."""

    def normalise(v: str) -> str:
        key = str(v).strip().lower().removeprefix("u-")
        if key not in allowed:
            raise ConfigError(f"unknown {what} {v!r} (expected one of {', '.join(allowed)})")
        return key

    if isinstance(value, Mapping):
        extra = [k for k in value if k not in tasks]
        if extra:
            raise ConfigError(f"{what} given for {extra[0]!r}, which is not one of the tasks {list(tasks)}")
        return {t: normalise(value.get(t, default)) for t in tasks}
    return dict.fromkeys(tasks, normalise(value))


def _values(records: pd.DataFrame, task: str) -> np.ndarray:
    """A task column as float, checked to hold only 1, 0, -1 and NaN."""
    try:
        values = records[task].to_numpy(dtype=float)
    except (TypeError, ValueError) as e:
        raise DataError(f"label column {task!r} is not numeric ({e})") from None
    bad = ~(np.isnan(values) | np.isin(values, (1.0, 0.0, -1.0)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"label column {task!r} holds {float(values[i])!r} at table row {i} "
            f"(image {records['image_id'].iat[i] if 'image_id' in records else i}); "
            "expected 1, 0, -1 or NaN"
        )
    return values


def apply_policy(
    records: pd.DataFrame,
    tasks: str | Sequence[str],
    policy: str | Mapping[str, str] = "ignore",
    *,
    blank: str | Mapping[str, str] = "negative",
) -> pd.DataFrame:
    """A copy of ``records`` whose task columns hold only 1, 0 or NaN (masked).

    ``policy`` maps uncertain (-1) labels: "ignore" -> NaN, "ones" -> 1, "zeros" -> 0 ("U-Ones" style
    spelling accepted). ``blank`` maps NaN: "negative" -> 0 (CheXpert's convention), "unknown" ->
    NaN. Either may be a dict task -> choice; tasks it omits get the default. Blank is decided from
    the original table, so an uncertain label that "ignore" turns into NaN is never made negative.
    """
    tasks = resolve_tasks(tasks, records)
    policies = _per_task(policy, tasks, POLICIES, "ignore", "uncertainty policy")
    blanks = _per_task(blank, tasks, BLANKS, "negative", "blank policy")
    out = records.copy()
    for task in tasks:
        values = _values(records, task)
        mapped = values.copy()
        if blanks[task] == "negative":
            mapped[np.isnan(values)] = 0.0
        mapped[values == -1.0] = _UNCERTAIN_TO[policies[task]]
        out[task] = mapped
    return out


def label_matrix(records: pd.DataFrame, tasks: str | Sequence[str]) -> np.ndarray:
    """Targets as a float32 array [n_images, n_tasks]; NaN marks an entry masked out of loss and metrics.

    Uncertain (-1) labels must have gone through :func:`apply_policy` first: a -1 here would be
    trained as a target value, so it raises a DataError instead.
    """
    tasks = resolve_tasks(tasks, records)
    columns = [_values(records, t) for t in tasks]
    for task, values in zip(tasks, columns, strict=True):
        n = int((values == -1.0).sum())
        if n:
            raise DataError(
                f"label column {task!r} still holds {n} uncertain (-1) labels; "
                "apply_policy(records, tasks, policy=...) first"
            )
    matrix = np.stack(columns, axis=1) if columns else np.zeros((len(records), 0))
    return np.ascontiguousarray(matrix, dtype=np.float32)
