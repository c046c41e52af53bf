"""What the dataset readers share: CSV cells and the cell parsers (the problem list is in
:mod:`mococxr.data.problems`, the duplicate and image checks in :mod:`mococxr.data.checks`).

A reader (:mod:`mococxr.data.readers`) parses its source into a :class:`Parsed` table, collecting a
:class:`Problem` for every bad cell instead of stopping at the first; :func:`finish` then adds the
duplicate and image problems and raises one :class:`DatasetError` listing them all, or returns the
records table. Rows are named as a user sees them in a spreadsheet: "line N" is the line of the CSV
file, the header being line 1, so the first data row is line 2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mococxr.data.checks import (
    decode_error,
    duplicate_problems,
    empty_problems,
    finish,
    image_problems,
    list_files,
)
from mococxr.data.problems import MAX_LISTED, DatasetError, Parsed, Problem, format_problems, ordered

__all__ = [
    "BASE_COLUMNS",
    "MAX_LISTED",
    "SEX_CODES",
    "DatasetError",
    "Parsed",
    "Problem",
    "abspath",
    "decode_error",
    "duplicate_problems",
    "empty_problems",
    "find_csv",
    "finish",
    "format_problems",
    "image_problems",
    "join_paths",
    "list_files",
    "ordered",
    "parse_age",
    "parse_labels",
    "parse_sex",
    "parse_view",
    "problems_at",
    "read_cells",
    "records_table",
    "task_columns",
]

BASE_COLUMNS = ["image_id", "path", "patient_id", "study_id", "view", "sex", "age"]

SEX_CODES = {
    "m": "M",
    "male": "M",
    "f": "F",
    "female": "F",
    "": "",
    "u": "",
    "unknown": "",
    "o": "",
    "other": "",
}
_VIEW = {
    "PA": "PA",
    "AP": "AP",
    "LATERAL": "LATERAL",
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LAT": "LATERAL",
    "FRONTAL": "FRONTAL",
    "": "",
}
_LABEL_HINT = "expected 1, 0, -1 (uncertain) or blank"


def task_columns(records: pd.DataFrame) -> list[str]:
    """The label columns of a records table: every column after the base columns, in table order."""
    return [c for c in records.columns if c not in BASE_COLUMNS]


# ---------------------------------------------------------------------------------------------------
# Parsing helpers: each takes text cells and returns parsed values plus the problems it found.


def abspath(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def find_csv(root: Path, csv: str | os.PathLike | None, candidates: Sequence[str], what: str) -> Path:
    """The label file: ``csv`` (relative to root) or the first candidate that exists under root."""
    if csv is not None:
        file = root / os.path.expanduser(csv)
        if not file.is_file():
            raise DatasetError([Problem(str(file), None, "", f"{what} label file not found")])
        return file
    for name in candidates:
        if (root / name).is_file():
            return root / name
    looked = ", ".join(str(root / name) for name in candidates)
    raise DatasetError(
        [
            Problem(
                str(root),
                None,
                "",
                f"no {what} label file found (looked for {looked}); pass csv= or check the dataset root",
            )
        ]
    )


def read_cells(file: Path, required: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Every cell of a CSV as stripped text ('' when blank), each row's file line, and the header.

    Columns are picked by position from a header read on its own, because NIH's header has unquoted
    commas (``OriginalImage[Width,Height]``): a CSV reader sees fewer header cells than row values, so
    letting it name the columns shifts them. Rows with extra or missing trailing values parse fine.
    """
    source = str(file)
    try:
        header = (
            pd.read_csv(file, header=None, nrows=1, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            .iloc[0]
            .str.strip()
            .tolist()
        )
    except (pd.errors.EmptyDataError, IndexError):
        raise DatasetError([Problem(source, 1, "", "the file is empty (expected a header line)")]) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as e:
        raise DatasetError([Problem(source, None, "", f"cannot read CSV: {e}")]) from None

    missing = [c for c in required if c not in header]
    if missing:
        shown = ", ".join(repr(c) for c in header)
        raise DatasetError(
            [Problem(source, 1, c, f"missing column (the header has {shown})") for c in missing]
        )
    seen: dict[str, int] = {}
    problems = []
    for i, name in enumerate(header):
        if name in seen and name:
            problems.append(
                Problem(source, 1, name, f"column appears twice (cells {seen[name] + 1} and {i + 1})")
            )
        seen.setdefault(name, i)
    if problems:
        raise DatasetError(problems)

    usecols = sorted(seen.values())
    try:
        cells = pd.read_csv(
            file,
            header=None,
            skiprows=1,
            usecols=usecols,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        cells = pd.DataFrame({i: pd.Series([], dtype=str) for i in usecols})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError, ValueError) as e:
        raise DatasetError([Problem(source, None, "", f"cannot read CSV: {e}")]) from None
    cells = cells.reindex(columns=usecols).fillna("").astype(str)
    cells.columns = [header[i] for i in usecols]
    for c in cells.columns:
        cells[c] = cells[c].str.strip()
    lines = np.arange(len(cells)) + 2
    keep = (cells != "").any(axis=1).to_numpy() if len(cells.columns) else np.zeros(len(cells), bool)
    return cells[keep].reset_index(drop=True), lines[keep], header


def problems_at(mask, cells: pd.Series, lines, file: str, column: str, message: str) -> list[Problem]:
    """A Problem for every row where ``mask`` holds; ``message`` is formatted with the row's cell."""
    idx = np.flatnonzero(np.asarray(mask))
    return [
        Problem(file, int(lines[i]), column, message.format(cell))
        for i, cell in zip(idx, cells.iloc[idx].tolist(), strict=True)
    ]


def _parse_each(
    text: pd.Series, parse, missing, lines, file: str, column: str, message: str, problems: list[Problem]
) -> np.ndarray:
    """Parse every distinct cell once and spread the results over the rows.

    A column holds few distinct values (labels, sex, view, age), so this is far faster than per-row
    parsing. ``parse`` returns a cell's value or raises KeyError/ValueError; a bad cell becomes
    ``missing`` and a Problem with ``message`` formatted with the cell.
    """
    codes, uniques = pd.factorize(text)
    values, bad = [], []
    for cell in uniques.tolist():
        try:
            values.append(parse(cell))
            bad.append(False)
        except (KeyError, ValueError):
            values.append(missing)
            bad.append(True)
    if not len(text):
        return np.array([], dtype=type(missing))
    bad_rows = np.asarray(bad)[codes]
    problems += problems_at(bad_rows, text, lines, file, column, message)
    return np.asarray(values, dtype=type(missing))[codes]


def _label(cell: str) -> float:
    if cell == "" or cell.lower() == "nan":
        return float("nan")
    value = float(cell)
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(cell)
    return value


def _age(cell: str) -> float:
    """NIH's older tables write '058Y', so a trailing Y is dropped."""
    if cell == "":
        return float("nan")
    value = float(cell.rstrip("Yy"))
    if not value >= 0:
        raise ValueError(cell)
    return value


def parse_labels(cells: pd.DataFrame, columns: Sequence[str], lines, file: str, problems: list[Problem]):
    """Label cells -> floats in {1, 0, -1, NaN}; '1', '1.0', '-1.0', blank (and 'nan') are accepted."""
    message = "unknown label value {!r} (" + _LABEL_HINT + ")"
    return {c: _parse_each(cells[c], _label, np.nan, lines, file, c, message, problems) for c in columns}


def parse_age(text: pd.Series, lines, file: str, column: str, problems: list[Problem]) -> np.ndarray:
    return _parse_each(text, _age, np.nan, lines, file, column, "age {!r} is not a number of years", problems)


def parse_sex(text: pd.Series, lines, file: str, column: str, problems: list[Problem]) -> np.ndarray:
    return _parse_each(
        text,
        lambda c: SEX_CODES[c.lower()],
        "",
        lines,
        file,
        column,
        "sex {!r} is not one of M, F, Male, Female, Unknown",
        problems,
    )


def parse_view(text: pd.Series, lines, file: str, column: str, problems: list[Problem]) -> np.ndarray:
    return _parse_each(
        text,
        lambda c: _VIEW[c.upper()],
        "",
        lines,
        file,
        column,
        "view {!r} is not one of PA, AP, LATERAL, FRONTAL",
        problems,
    )


def records_table(image_id, path, patient_id, study_id, view, sex, age, labels: dict) -> pd.DataFrame:
    """Assemble the records table from aligned columns, in the contract's column order and dtypes."""
    base = {
        "image_id": image_id,
        "path": path,
        "patient_id": patient_id,
        "study_id": study_id,
        "view": view,
        "sex": sex,
    }
    frame = pd.DataFrame({k: pd.Series(v, dtype=str).reset_index(drop=True) for k, v in base.items()})
    frame["age"] = np.asarray(age, dtype=float)
    for name, values in labels.items():
        frame[name] = np.asarray(values, dtype=float)
    return frame


def join_paths(base: str, relative: pd.Series) -> pd.Series:
    """Absolute paths: relative ones joined to ``base``, absolute ones kept; '.', '..', '//' resolved."""
    joined = relative.where(relative.str.startswith("/"), base + "/" + relative)
    messy = joined.str.contains(r"(?:^|/)\.{1,2}(?:/|$)|//", regex=True)
    if messy.any():
        joined = joined.copy()
        joined[messy] = [os.path.normpath(p) for p in joined[messy]]
    return joined
