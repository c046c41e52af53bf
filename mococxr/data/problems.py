"""The problem list a dataset reader collects: one :class:`Problem` per bad cell, row or file.

A reader parses its source into a :class:`Parsed` table, collecting problems instead of stopping at
the first; :class:`DatasetError` raises them all at once, ordered and listed by :func:`format_problems`.
Rows are named as a user sees them in a spreadsheet: "line N" is the line of the CSV file, the header
being line 1, so the first data row is line 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mococxr.errors import DataError

MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file, CSV line, field) and what.

    ``row`` is the line of the CSV file as a spreadsheet numbers it (header = line 1), or None where
    the problem is not tied to a row (a whole file, or a dataset without a CSV).
    """

    file: str
    row: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}, line {self.row}"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.message}"


class DatasetError(DataError):
    """The DataError a reader raises; ``problems`` holds every :class:`Problem` it found."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = ordered(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: Sequence[Problem], limit: int = MAX_LISTED) -> str:
    """One line per problem, the first ``limit`` of them and a count of the rest."""
    n = len(problems)
    if n == 1 and not problems[0].message.startswith("image not found"):
        return str(problems[0])  # one line, as the CLI prints an error
    head = "1 problem in the dataset:" if n == 1 else f"{n} problems in the dataset:"
    lines = [head, *(f"  {p}" for p in problems[:limit])]
    if n > limit:
        lines.append(f"  ... and {n - limit} more (`mococxr data check` lists them all)")
    if any(p.message.startswith("image not found") for p in problems):
        lines.append(
            "  (images elsewhere? point --root at the folder the image paths are relative to; labels "
            "without images: from Python, read_records(..., require_images=False))"
        )
    return "\n".join(lines)


@dataclass
class Parsed:
    """A parsed table before its images are checked; ``lines`` is each row's CSV line (None: no CSV)."""

    records: pd.DataFrame
    lines: np.ndarray | None
    file: str
    image_field: str
    problems: list[Problem] = field(default_factory=list)


def ordered(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.row or 0))
