"""The checks a parsed table passes before it is a records table: duplicates, emptiness and images.

Images are checked for existence from one directory listing per folder, and decoded (with
``verify_images``) in threads, PIL releasing the GIL. :func:`finish` runs every check and raises one
:class:`~mococxr.data.problems.DatasetError` listing all the problems found, or returns the records.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from mococxr.data.problems import DatasetError, Parsed, Problem

# ---------------------------------------------------------------------------------------------------
# Images: existence from one directory listing per folder, decoding in threads (PIL releases the GIL).


def list_files(folder: str | os.PathLike) -> set[str]:
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file()}
    except OSError:
        return set()


def _exists(paths: Iterable[str]) -> np.ndarray:
    """Whether each path is a file, listing each parent folder once instead of a stat per image."""
    listings: dict[str, set[str]] = {}
    out = []
    for p in paths:
        parent, name = os.path.split(p)
        names = listings.get(parent)
        if names is None:
            names = listings[parent] = list_files(parent)
        out.append(name in names)
    return np.array(out, dtype=bool)


def decode_error(path: str | os.PathLike) -> str | None:
    """Why an image cannot be decoded (a full decode, so truncated files fail), or None if it can."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # any decoder failure is a property of the file to report, not a crash
        return f"{type(e).__name__}: {e}"
    return None


def _decode_errors(paths: Sequence[str]) -> list[str | None]:
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(decode_error, paths)
        return list(
            tqdm(it, total=len(paths), desc="verifying images", unit="img", disable=None, leave=False)
        )


def duplicate_problems(parsed: Parsed) -> list[Problem]:
    """Rows naming an image (by id or by resolved path) that an earlier row already named."""
    records, lines = parsed.records, parsed.lines
    problems = []
    flagged = np.zeros(len(records), dtype=bool)
    for column, what in (("image_id", "image"), ("path", "image file")):
        values = records[column]
        later = values.duplicated(keep="first").to_numpy() & ~flagged  # one problem per row
        flagged |= later
        if not later.any():
            continue
        first = pd.Series(np.arange(len(values))).groupby(values.to_numpy()).transform("min").to_numpy()
        for i in np.flatnonzero(later):
            if lines is None:
                problems.append(
                    Problem(
                        records["path"].iat[i],
                        None,
                        parsed.image_field,
                        f"duplicate {what} {values.iat[i]!r}",
                    )
                )
            else:
                problems.append(
                    Problem(
                        parsed.file,
                        int(lines[i]),
                        parsed.image_field,
                        f"duplicate {what} {values.iat[i]!r} (first on line {lines[first[i]]})",
                    )
                )
    return problems


def empty_problems(parsed: Parsed) -> list[Problem]:
    """A table without rows (a header-only CSV, an empty folder) is a problem, not an empty dataset."""
    if len(parsed.records) or parsed.problems:
        return []
    return [
        Problem(
            parsed.file,
            None,
            "",
            "no images listed: the label file has no data rows (or the folder no images)",
        )
    ]


def image_problems(parsed: Parsed, *, verify: bool) -> list[Problem]:
    paths = parsed.records["path"].to_numpy(str)
    exists = _exists(paths)

    def where(i: int) -> tuple[str, int | None]:
        if parsed.lines is None:
            return paths[i], None
        return parsed.file, int(parsed.lines[i])

    if len(paths) > 1 and not exists.any():
        # One line rather than one per row: the images are elsewhere, or this is a labels-only table.
        return [
            Problem(
                parsed.file,
                None,
                parsed.image_field,
                f"none of the {len(paths)} listed images exists (first: {paths[0]}); point --root "
                "at the folder the image paths are relative to (from Python, labels alone: "
                "require_images=False)",
            )
        ]
    problems = [
        Problem(*where(i), parsed.image_field, f"image not found: {paths[i]}")
        for i in np.flatnonzero(~exists)
    ]
    if verify:
        present = np.flatnonzero(exists)
        for i, error in zip(present, _decode_errors(paths[present].tolist()), strict=True):
            if error is not None:
                problems.append(
                    Problem(*where(i), parsed.image_field, f"cannot decode image {paths[i]}: {error}")
                )
    return problems


def finish(parsed: Parsed, *, require_images: bool, verify_images: bool) -> pd.DataFrame:
    if verify_images and not require_images:
        raise ValueError("verify_images=True needs require_images=True")
    problems = parsed.problems + duplicate_problems(parsed) + empty_problems(parsed)
    if require_images:
        problems += image_problems(parsed, verify=verify_images)
    if problems:
        raise DatasetError(problems)
    return parsed.records
