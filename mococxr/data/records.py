"""Dataset readers: CheXpert, NIH ChestX-ray14, Shenzhen/Montgomery and generic CSVs -> one records table.

Every reader returns the same table, one row per image, so that nothing downstream knows which dataset
it reads::

    image_id, path, patient_id, study_id, view, sex, age, <one float column per task>

Task columns keep the source's names and hold 1.0 (positive), 0.0 (negative), -1.0 (uncertain, before
a policy applies) or NaN (not mentioned / unknown). Readers never apply a label policy: a blank CheXpert
cell stays NaN here and :func:`mococxr.data.labels.apply_policy` decides what it means (by default
``blank="negative"``, the convention of CheXpert's training file, where blank = not mentioned = negative).

Rows are named as a user sees them in a spreadsheet: "line N" is the line of the CSV file, the header
being line 1, so the first data row is line 2.

A reader does not stop at the first problem: it collects every problem it finds (a missing column, an
unknown label value, a duplicate, missing or undecodable image) and raises one :class:`DatasetError`
listing them (the first 20 and a count). :func:`check_dataset` returns them all without raising.

This module is the entry point by dataset name (one of :data:`mococxr.config.DATASETS`); the readers
themselves are in :mod:`mococxr.data.readers` and what they share in :mod:`mococxr.data.parsing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from mococxr.config import DATASETS
from mococxr.data.parsing import (
    BASE_COLUMNS,
    DatasetError,
    Parsed,
    Problem,
    decode_error,
    duplicate_problems,
    empty_problems,
    finish,
    format_problems,
    image_problems,
    ordered,
    task_columns,
)
from mococxr.data.readers import (
    CHEXPERT_OBSERVATIONS,
    NIH_FINDINGS,
    parse_chexpert,
    parse_generic,
    parse_nih,
    parse_tb,
    read_chexpert,
    read_csv_records,
    read_nih,
    read_tb,
)
from mococxr.errors import ConfigError, DataError

__all__ = [
    "BASE_COLUMNS",
    "CHEXPERT_OBSERVATIONS",
    "DATASETS",
    "NIH_FINDINGS",
    "DatasetError",
    "Problem",
    "check_dataset",
    "decode_error",
    "format_problems",
    "read_chexpert",
    "read_csv_records",
    "read_nih",
    "read_records",
    "read_tb",
    "summarize",
    "task_columns",
]


# ---------------------------------------------------------------------------------------------------
# One entry point per dataset name


def _tb(dataset: str) -> Callable[..., Parsed]:
    def parse(root, csv=None, **kw) -> Parsed:
        if csv is not None:
            raise ConfigError(f"dataset {dataset!r} takes no CSV (labels are in the file names); got {csv}")
        return parse_tb(root, source=None if dataset == "tb" else dataset, **kw)

    return parse


def _generic(root, csv=None, **kw) -> Parsed:
    if csv is None:
        return parse_generic(root, None, **kw)
    return parse_generic(csv, root, **kw)


# Each reader as ``parse(root, csv=None, **kw)``. The names are config.DATASETS, checked below, so a
# dataset the config accepts always has a reader and a reader is never unreachable from a config.
_PARSERS: dict[str, Callable[..., Parsed]] = {
    "chexpert": parse_chexpert,
    "nih": parse_nih,
    "shenzhen": _tb("shenzhen"),
    "montgomery": _tb("montgomery"),
    "tb": _tb("tb"),
    "csv": _generic,
}
if tuple(_PARSERS) != DATASETS:
    raise ImportError(f"the readers {tuple(_PARSERS)} and mococxr.config.DATASETS {DATASETS} disagree")


def _parse(dataset: str, root, csv=None, **kw) -> Parsed:
    parse = _PARSERS.get(dataset)
    if parse is None:
        raise ConfigError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    return parse(root, csv, **kw)


def read_records(
    dataset: str, root, csv=None, *, verify_images: bool = False, require_images: bool = True, **kw
) -> pd.DataFrame:
    """Read any supported dataset by name (one of :data:`DATASETS`) into a records table.

    For "csv", ``csv`` is the label file and ``root`` the folder its paths are relative to; with
    ``csv=None``, ``root`` is the CSV file itself. Other keywords go to the reader (e.g. frontal_only).
    """
    parsed = _parse(dataset, root, csv, **kw)
    return finish(parsed, require_images=require_images, verify_images=verify_images)


def check_dataset(dataset: str, root, csv=None, *, verify_images: bool = True, **kw) -> list[Problem]:
    """Every problem in a dataset, without raising: each row, each label, and each image decoded.

    For ``mococxr data check``. Returns an empty list for a clean dataset. A problem that stops
    parsing (no label file, missing columns) is returned alone, as nothing after it can be checked.
    """
    try:
        parsed = _parse(dataset, root, csv, **kw)
    except DatasetError as e:
        return e.problems
    problems = (
        parsed.problems
        + duplicate_problems(parsed)
        + empty_problems(parsed)
        + image_problems(parsed, verify=verify_images)
    )
    return ordered(problems)


# ---------------------------------------------------------------------------------------------------
# Summary


def _counts(values: pd.Series) -> str:
    counts = values.replace("", "unknown").value_counts()
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def summarize(records: pd.DataFrame, tasks: Sequence[str] | None = None) -> str:
    """A plain-text summary: images/patients/studies, label counts per task, views, sex and age.

    Label counts are per value: 1 (positive), 0 (negative), -1 (uncertain), NaN (unknown/blank).
    """
    tasks = task_columns(records) if tasks is None else list(tasks)
    missing = [t for t in tasks if t not in records.columns]
    if missing:
        raise DataError(
            f"summarize: no column {missing[0]!r} in the records (task columns: "
            f"{', '.join(task_columns(records)) or 'none'})"
        )
    lines = [
        f"images {len(records)}, patients {records['patient_id'].nunique()}, "
        f"studies {records['study_id'].nunique()}"
    ]
    if tasks:
        rows = []
        for t in tasks:
            v = records[t].to_numpy(float)
            rows.append(
                {
                    "task": t,
                    "1": int((v == 1).sum()),
                    "0": int((v == 0).sum()),
                    "-1": int((v == -1).sum()),
                    "NaN": int(np.isnan(v).sum()),
                }
            )
        lines += ["", pd.DataFrame(rows).set_index("task").rename_axis(None).to_string(), ""]
    lines.append(f"view: {_counts(records['view'])}")
    lines.append(f"sex: {_counts(records['sex'])}")
    age = records["age"]
    if age.notna().any():
        lines.append(
            f"age: median {age.median():g}, range {age.min():g}-{age.max():g}, "
            f"unknown {int(age.isna().sum())}"
        )
    else:
        lines.append("age: unknown")
    return "\n".join(lines)
