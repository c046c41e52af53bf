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
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from mococxr.errors import ConfigError, DataError

BASE_COLUMNS = ["image_id", "path", "patient_id", "study_id", "view", "sex", "age"]

CHEXPERT_OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
]
DATASETS = ("chexpert", "nih", "shenzhen", "montgomery", "tb", "csv")
MAX_LISTED = 20

_CHEXPERT_CSVS = ("CheXpert-v1.0-small/train.csv", "CheXpert-v1.0/train.csv", "train.csv")
_CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
# sample.csv comes before the .gz tables: the sample folder ships the full metadata table without images.
_NIH_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "sample.csv",
             "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz")
_NIH_COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
_TB_PREFIXES = {"shenzhen": "CHNCXR", "montgomery": "MCUCXR"}
_TB_FOLDERS = (".", "CXR_png", "images")
_GENERIC_RESERVED = ("image_id", "path", "patient_id", "study_id", "view", "sex", "age")

_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "": "", "u": "", "unknown": "", "o": "", "other": ""}
_VIEW = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LATERAL", "RL": "LATERAL", "LAT": "LATERAL",
         "FRONTAL": "FRONTAL", "": ""}
_LABEL_HINT = "expected 1, 0, -1 (uncertain) or blank"


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
        self.problems = _ordered(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: Sequence[Problem], limit: int = MAX_LISTED) -> str:
    """One line per problem, the first ``limit`` of them and a count of the rest."""
    n = len(problems)
    head = "1 problem in the dataset:" if n == 1 else f"{n} problems in the dataset:"
    lines = [head, *(f"  {p}" for p in problems[:limit])]
    if n > limit:
        lines.append(f"  ... and {n - limit} more (`mococxr data check` lists them all)")
    if any(p.message.startswith("image not found") for p in problems):
        lines.append("  (images missing on purpose? read the labels alone with require_images=False)")
    return "\n".join(lines)


def task_columns(records: pd.DataFrame) -> list[str]:
    """The label columns of a records table: every column after the base columns, in table order."""
    return [c for c in records.columns if c not in BASE_COLUMNS]


# ---------------------------------------------------------------------------------------------------
# Parsing helpers: each takes text cells and returns parsed values plus the problems it found.


@dataclass
class _Parsed:
    """A parsed table before its images are checked; ``lines`` is each row's CSV line (None: no CSV)."""

    records: pd.DataFrame
    lines: np.ndarray | None
    file: str
    image_field: str
    problems: list[Problem] = field(default_factory=list)


def _ordered(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.row or 0))


def _abspath(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def _find_csv(root: Path, csv: str | os.PathLike | None, candidates: Sequence[str], what: str) -> Path:
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
    raise DatasetError([Problem(str(root), None, "", f"no {what} label file found (looked for {looked}); "
                                                     "pass csv= or check the dataset root")])


def _read_cells(file: Path, required: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Every cell of a CSV as stripped text ('' when blank), each row's file line, and the header.

    Columns are picked by position from a header read on its own, because NIH's header has unquoted
    commas (``OriginalImage[Width,Height]``): a CSV reader sees fewer header cells than row values, so
    letting it name the columns shifts them. Rows with extra or missing trailing values parse fine.
    """
    source = str(file)
    try:
        header = pd.read_csv(file, header=None, nrows=1, dtype=str, keep_default_na=False,
                             encoding="utf-8-sig").iloc[0].str.strip().tolist()
    except (pd.errors.EmptyDataError, IndexError):
        raise DatasetError([Problem(source, 1, "", "the file is empty (expected a header line)")]) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as e:
        raise DatasetError([Problem(source, None, "", f"cannot read CSV: {e}")]) from None

    missing = [c for c in required if c not in header]
    if missing:
        shown = ", ".join(repr(c) for c in header)
        raise DatasetError([Problem(source, 1, c, f"missing column (the header has {shown})") for c in missing])
    seen: dict[str, int] = {}
    problems = []
    for i, name in enumerate(header):
        if name in seen and name:
            problems.append(Problem(source, 1, name, f"column appears twice (cells {seen[name] + 1} and {i + 1})"))
        seen.setdefault(name, i)
    if problems:
        raise DatasetError(problems)

    usecols = sorted(seen.values())
    try:
        cells = pd.read_csv(file, header=None, skiprows=1, usecols=usecols, dtype=str, keep_default_na=False,
                            skip_blank_lines=False, encoding="utf-8-sig")
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


def _problems_at(mask, cells: pd.Series, lines, file: str, column: str, message: str) -> list[Problem]:
    """A Problem for every row where ``mask`` holds; ``message`` is formatted with the row's cell."""
    idx = np.flatnonzero(np.asarray(mask))
    return [Problem(file, int(lines[i]), column, message.format(cell))
            for i, cell in zip(idx, cells.iloc[idx].tolist(), strict=True)]


def _parse_each(text: pd.Series, parse, missing, lines, file: str, column: str, message: str,
                problems: list[Problem]) -> np.ndarray:
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
    problems += _problems_at(bad_rows, text, lines, file, column, message)
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


def _parse_labels(cells: pd.DataFrame, columns: Sequence[str], lines, file: str, problems: list[Problem]):
    """Label cells -> floats in {1, 0, -1, NaN}; '1', '1.0', '-1.0', blank (and 'nan') are accepted."""
    message = "unknown label value {!r} (" + _LABEL_HINT + ")"
    return {c: _parse_each(cells[c], _label, np.nan, lines, file, c, message, problems) for c in columns}


def _parse_age(text: pd.Series, lines, file: str, column: str, problems: list[Problem]) -> np.ndarray:
    return _parse_each(text, _age, np.nan, lines, file, column, "age {!r} is not a number of years", problems)


def _parse_sex(text: pd.Series, lines, file: str, column: str, problems: list[Problem]) -> np.ndarray:
    return _parse_each(text, lambda c: _SEX[c.lower()], "", lines, file, column,
                       "sex {!r} is not one of M, F, Male, Female, Unknown", problems)


def _parse_view(text: pd.Series, lines, file: str, column: str, problems: list[Problem]) -> np.ndarray:
    return _parse_each(text, lambda c: _VIEW[c.upper()], "", lines, file, column,
                       "view {!r} is not one of PA, AP, LATERAL, FRONTAL", problems)


def _table(image_id, path, patient_id, study_id, view, sex, age, labels: dict) -> pd.DataFrame:
    """Assemble the records table from aligned columns, in the contract's column order and dtypes."""
    base = {"image_id": image_id, "path": path, "patient_id": patient_id, "study_id": study_id,
            "view": view, "sex": sex}
    frame = pd.DataFrame({k: pd.Series(v, dtype=str).reset_index(drop=True) for k, v in base.items()})
    frame["age"] = np.asarray(age, dtype=float)
    for name, values in labels.items():
        frame[name] = np.asarray(values, dtype=float)
    return frame


def _join(base: str, relative: pd.Series) -> pd.Series:
    """Absolute paths: relative ones joined to ``base``, absolute ones kept; '.', '..', '//' resolved."""
    joined = relative.where(relative.str.startswith("/"), base + "/" + relative)
    messy = joined.str.contains(r"(?:^|/)\.{1,2}(?:/|$)|//", regex=True)
    if messy.any():
        joined = joined.copy()
        joined[messy] = [os.path.normpath(p) for p in joined[messy]]
    return joined


# ---------------------------------------------------------------------------------------------------
# Images: existence from one directory listing per folder, decoding in threads (PIL releases the GIL).


def _list_files(folder: str | os.PathLike) -> set[str]:
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
            names = listings[parent] = _list_files(parent)
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
        return list(tqdm(it, total=len(paths), desc="verifying images", unit="img", disable=None, leave=False))


def _duplicate_problems(parsed: _Parsed) -> list[Problem]:
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
                problems.append(Problem(records["path"].iat[i], None, parsed.image_field,
                                        f"duplicate {what} {values.iat[i]!r}"))
            else:
                problems.append(Problem(parsed.file, int(lines[i]), parsed.image_field,
                                        f"duplicate {what} {values.iat[i]!r} (first on line {lines[first[i]]})"))
    return problems


def _image_problems(parsed: _Parsed, *, verify: bool) -> list[Problem]:
    paths = parsed.records["path"].to_numpy(str)
    exists = _exists(paths)

    def where(i: int) -> tuple[str, int | None]:
        if parsed.lines is None:
            return paths[i], None
        return parsed.file, int(parsed.lines[i])

    if len(paths) > 1 and not exists.any():
        # One line rather than one per row: the images are elsewhere, or this is a labels-only table.
        return [Problem(parsed.file, None, parsed.image_field,
                        f"none of the {len(paths)} listed images exists (first: {paths[0]}); check the "
                        "root, or read the labels alone with require_images=False")]
    problems = [Problem(*where(i), parsed.image_field, f"image not found: {paths[i]}")
                for i in np.flatnonzero(~exists)]
    if verify:
        present = np.flatnonzero(exists)
        for i, error in zip(present, _decode_errors(paths[present].tolist()), strict=True):
            if error is not None:
                problems.append(Problem(*where(i), parsed.image_field, f"cannot decode image {paths[i]}: {error}"))
    return problems


def _finish(parsed: _Parsed, *, require_images: bool, verify_images: bool) -> pd.DataFrame:
    if verify_images and not require_images:
        raise ValueError("verify_images=True needs require_images=True")
    problems = parsed.problems + _duplicate_problems(parsed)
    if require_images:
        problems += _image_problems(parsed, verify=verify_images)
    if problems:
        raise DatasetError(problems)
    return parsed.records


# ---------------------------------------------------------------------------------------------------
# CheXpert


def _chexpert_base(root: Path, relative: pd.Series) -> str:
    """The folder CSV paths are relative to: root, or its parent when root is the CheXpert folder itself.

    CheXpert writes paths as ``CheXpert-v1.0-small/train/...``; a root that *is* that folder (holding
    train.csv) would otherwise double the first component.
    """
    names = set(relative.str.replace(r"/.*$", "", regex=True).unique().tolist())
    if root.name in names and not (root / root.name).exists():
        return str(root.parent)
    return str(root)


def _parse_chexpert(root, csv=None, *, frontal_only: bool = False) -> _Parsed:
    root = _abspath(root)
    file = _find_csv(root, csv, _CHEXPERT_CSVS, "CheXpert")
    cells, lines, _ = _read_cells(file, _CHEXPERT_COLUMNS)
    source, problems = str(file), []

    relative = cells["Path"]
    ok = relative.str.contains(r"(?:^|/)patient\d+/study\d+/[^/]+$", regex=True)
    problems += _problems_at(~ok, relative, lines, source, "Path",
                             "path {!r} is not of the form .../patientNNNNN/studyN/<image>")
    study_id = relative.str.replace(r"^(?:.*/)?(patient\d+/study\d+)/[^/]+$", r"\1", regex=True).where(ok, "")
    patient_id = study_id.str.replace(r"/.*$", "", regex=True)

    orientation = cells["Frontal/Lateral"].str.lower()
    bad = ~orientation.isin(["frontal", "lateral"]).to_numpy()
    problems += _problems_at(bad, cells["Frontal/Lateral"], lines, source, "Frontal/Lateral",
                             "value {!r} is not Frontal or Lateral")
    projection = cells["AP/PA"].str.upper()
    view = (projection.where(projection.isin(["AP", "PA"]), "FRONTAL")
            .mask(orientation.eq("lateral"), "LATERAL").mask(bad, ""))

    records = _table(
        image_id=relative,
        path=_join(_chexpert_base(root, relative), relative),
        patient_id=patient_id,
        study_id=study_id,
        view=view,
        sex=_parse_sex(cells["Sex"], lines, source, "Sex", problems),
        age=_parse_age(cells["Age"], lines, source, "Age", problems),
        labels=_parse_labels(cells, CHEXPERT_OBSERVATIONS, lines, source, problems),
    )
    if frontal_only:
        keep = orientation.eq("frontal").to_numpy()
        records, lines = records[keep].reset_index(drop=True), lines[keep]
    return _Parsed(records, lines, source, "Path", problems)


def read_chexpert(root, csv=None, *, frontal_only: bool = False, verify_images: bool = False,
                  require_images: bool = True) -> pd.DataFrame:
    """Read CheXpert as released (``train.csv``/``valid.csv``) into a records table.

    ``root`` is the folder that contains ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``); the CSV's
    ``Path`` column is resolved against it. ``csv`` defaults to the first of
    root/CheXpert-v1.0-small/train.csv, root/CheXpert-v1.0/train.csv, root/train.csv; a relative
    ``csv`` is taken relative to root. patient_id ("patient00001") and study_id
    ("patient00001/study1") come from the path. view is PA/AP for frontal images with a projection,
    FRONTAL when AP/PA is blank, LATERAL for laterals. Blank labels stay NaN (see
    :func:`mococxr.data.labels.apply_policy`, whose ``blank="negative"`` default follows CheXpert).

    ``frontal_only`` keeps frontal images; ``require_images=False`` reads labels without the images;
    ``verify_images`` decodes every image. Raises :class:`DatasetError` listing every problem.
    """
    parsed = _parse_chexpert(root, csv, frontal_only=frontal_only)
    return _finish(parsed, require_images=require_images, verify_images=verify_images)


# ---------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def _nih_image_folders(root: Path) -> list[Path]:
    """NIH ships images in ``images/`` or, split in twelve archives, ``images_001/images/`` ..."""
    return [root / "images", *sorted(root.glob("images_*/images"))]


def _parse_nih(root, csv=None) -> _Parsed:
    root = _abspath(root)
    file = _find_csv(root, csv, _NIH_CSVS, "NIH ChestX-ray14")
    cells, lines, _ = _read_cells(file, _NIH_COLUMNS)
    source, problems = str(file), []

    image_id = cells["Image Index"]
    problems += _problems_at(image_id.eq(""), image_id, lines, source, "Image Index", "blank image name")

    # One substring test per finding on '|'-padded text; whatever is left after removing every known
    # name is an unknown token. Faster here than str.get_dummies on 112k rows.
    findings = cells["Finding Labels"]
    padded = "|" + findings + "|"
    labels = {f: padded.str.contains(f"|{f}|", regex=False).to_numpy(float) for f in NIH_FINDINGS}
    names = "|".join(re.escape(f) for f in [*NIH_FINDINGS, "No Finding"])
    unknown = padded.str.replace(rf"\|(?:{names})(?=\|)", "", regex=True).ne("|") & findings.ne("")
    problems += _problems_at(unknown, findings, lines, source, "Finding Labels",
                             "unknown finding in {!r} (expected NIH finding names joined by '|', "
                             "or 'No Finding')")
    mixed = padded.str.contains("|No Finding|", regex=False).to_numpy() & (sum(labels.values()) > 0)
    problems += _problems_at(mixed, findings, lines, source, "Finding Labels",
                             "{!r} combines 'No Finding' with findings")
    problems += _problems_at(findings.eq(""), findings, lines, source, "Finding Labels",
                             "blank (NIH writes 'No Finding' when there is none)")

    patient_id = cells["Patient ID"]
    problems += _problems_at(patient_id.eq(""), patient_id, lines, source, "Patient ID", "blank patient id")

    located: dict[str, str] = {}
    for folder in _nih_image_folders(root):
        for name in _list_files(folder):
            if name in located:
                problems.append(Problem(str(folder / name), None, "Image Index",
                                        f"image also found in {located[name]}; keep one copy"))
            else:
                located[name] = str(folder)
    folder = image_id.map(located).fillna(str(root / "images"))

    records = _table(
        image_id=image_id,
        path=folder + "/" + image_id,
        patient_id=patient_id,
        study_id=image_id.str.replace(r"\.png$", "", regex=True),  # one image per NIH follow-up visit
        view=_parse_view(cells["View Position"], lines, source, "View Position", problems),
        sex=_parse_sex(cells["Patient Gender"], lines, source, "Patient Gender", problems),
        age=_parse_age(cells["Patient Age"], lines, source, "Patient Age", problems),
        labels=labels,
    )
    return _Parsed(records, lines, source, "Image Index", problems)


def read_nih(root, csv=None, *, verify_images: bool = False, require_images: bool = True) -> pd.DataFrame:
    """Read NIH ChestX-ray14 (``Data_Entry_2017*.csv[.gz]`` or the sample's ``sample.csv``).

    ``csv`` defaults to the first of Data_Entry_2017_v2020.csv, Data_Entry_2017.csv, sample.csv and
    the .csv.gz tables under root. Images are looked up in root/images/ and root/images_NNN/images/.
    One column per NIH finding (:data:`NIH_FINDINGS`) holding 1.0 or 0.0, never NaN; study_id is the
    image name without extension (NIH has one image per follow-up visit). ``require_images=False``
    reads the metadata table alone (paths then point where the image would be).
    """
    parsed = _parse_nih(root, csv)
    return _finish(parsed, require_images=require_images, verify_images=verify_images)


# ---------------------------------------------------------------------------------------------------
# Shenzhen and Montgomery tuberculosis sets


def _clinical_reading(root: Path, stem: str) -> tuple[str, float]:
    """Sex and age from ``ClinicalReadings/<stem>.txt`` when the release includes it, else ('', NaN).

    Montgomery writes "Patient's Sex: F / Patient's Age: 040Y"; Shenzhen writes "male 35yrs".
    """
    try:
        text = (root / "ClinicalReadings" / f"{stem}.txt").read_text(errors="replace")
    except OSError:
        return "", float("nan")
    sex = re.search(r"sex:\s*([MF])\b|\b(female|male)\b", text, re.IGNORECASE)
    age = re.search(r"(\d+)\s*(?:y|yr|yrs|years?)\b", text, re.IGNORECASE)
    sex_value = _SEX.get((sex.group(1) or sex.group(2)).lower(), "") if sex else ""
    return sex_value, float(age.group(1)) if age else float("nan")


def _parse_tb(root, *, source: str | None = None) -> _Parsed:
    root = _abspath(root)
    if source is not None and source not in _TB_PREFIXES:
        raise ConfigError(f"unknown TB source {source!r} (expected one of {sorted(_TB_PREFIXES)} or None)")
    prefixes = [_TB_PREFIXES[source]] if source else list(_TB_PREFIXES.values())
    pattern = re.compile(rf"^({'|'.join(prefixes)})_(\d+)_(.*)\.png$", re.IGNORECASE)
    problems: list[Problem] = []
    found: dict[str, str] = {}
    for sub in _TB_FOLDERS:
        folder = os.path.normpath(root / sub)
        for name in sorted(_list_files(folder)):
            if not pattern.match(name):
                continue
            if name in found:
                problems.append(Problem(os.path.join(folder, name), None, "Tuberculosis",
                                        f"duplicate image: also in {found[name]}"))
            else:
                found[name] = folder
    if not found:
        looked = ", ".join(str(root / sub) for sub in _TB_FOLDERS)
        names = " or ".join(f"{p}_NNNN_<0|1>.png" for p in prefixes)
        raise DatasetError([Problem(str(root), None, "", f"no {names} images found (looked in {looked})")])

    names = sorted(found)
    paths, labels, stems, view, sex, age = [], [], [], [], [], []
    for name in names:
        prefix, number, digit = pattern.match(name).groups()
        paths.append(os.path.join(found[name], name))
        if digit not in ("0", "1"):
            problems.append(Problem(paths[-1], None, "Tuberculosis",
                                    f"label {digit!r} before .png is not 0 (normal) or 1 (tuberculosis)"))
        labels.append(float(digit) if digit in ("0", "1") else np.nan)
        stems.append(f"{prefix.upper()}_{number}")
        view.append("PA" if prefix.upper() == "MCUCXR" else "FRONTAL")  # Montgomery is all PA
        s, a = _clinical_reading(root, name[:-4])
        sex.append(s)
        age.append(a)
    records = _table(names, paths, stems, stems, view, sex, age, {"Tuberculosis": labels})
    return _Parsed(records, None, str(root), "Tuberculosis", problems)


def read_tb(root, *, verify_images: bool = False, source: str | None = None) -> pd.DataFrame:
    """Read the Shenzhen (``CHNCXR_0001_0.png``) and/or Montgomery (``MCUCXR_0001_0.png``) TB sets.

    The digit before the extension is the Tuberculosis label. Images may sit in root, root/CXR_png/
    or root/images/. One image per patient, so patient_id = study_id = "CHNCXR_0001". ``source``
    ("shenzhen" or "montgomery") keeps one set; None keeps both.
    """
    return _finish(_parse_tb(root, source=source), require_images=True, verify_images=verify_images)


# ---------------------------------------------------------------------------------------------------
# Generic CSV


def _parse_generic(csv, root=None) -> _Parsed:
    file = _abspath(csv)
    if not file.is_file():
        raise DatasetError([Problem(str(file), None, "", "CSV file not found")])
    base = _abspath(root) if root is not None else file.parent
    cells, lines, header = _read_cells(file, ["path"])
    source, problems = str(file), []
    tasks = [c for c in header if c not in _GENERIC_RESERVED and c and not c.startswith("Unnamed:")]

    relative = cells["path"]
    problems += _problems_at(relative.eq(""), relative, lines, source, "path", "blank path")
    image_id = cells["image_id"].where(cells["image_id"].ne(""), relative) if "image_id" in cells else relative
    # Without patient ids every image is its own patient: splits cannot then keep a patient together.
    patient_id = cells["patient_id"].where(cells["patient_id"].ne(""), image_id) if "patient_id" in cells \
        else image_id
    study_id = cells["study_id"].where(cells["study_id"].ne(""), image_id) if "study_id" in cells else image_id
    blank = pd.Series([""] * len(cells), dtype=str)
    records = _table(
        image_id=image_id,
        path=_join(str(base), relative),
        patient_id=patient_id,
        study_id=study_id,
        view=_parse_view(cells.get("view", blank), lines, source, "view", problems),
        sex=_parse_sex(cells.get("sex", blank), lines, source, "sex", problems),
        age=_parse_age(cells.get("age", blank), lines, source, "age", problems),
        labels=_parse_labels(cells, tasks, lines, source, problems),
    )
    return _Parsed(records, lines, source, "path", problems)


def read_csv_records(csv, root=None, *, verify_images: bool = False, require_images: bool = True) -> pd.DataFrame:
    """Read a generic CSV: a ``path`` column plus label columns, one row per image.

    Optional columns: ``image_id`` (default: path as written), ``patient_id`` and ``study_id``
    (default: the image id, i.e. each image its own patient), ``view``, ``sex``, ``age``. Every other
    named column is a task holding 1, 0, -1 or blank ("1.0" style accepted); unnamed columns (a
    saved pandas index) are ignored. Relative paths are taken relative to ``root`` (default: the
    CSV's folder).
    """
    return _finish(_parse_generic(csv, root), require_images=require_images, verify_images=verify_images)


# ---------------------------------------------------------------------------------------------------
# One entry point per dataset name


def _parse(dataset: str, root, csv=None, **kw) -> _Parsed:
    if dataset == "chexpert":
        return _parse_chexpert(root, csv, **kw)
    if dataset == "nih":
        return _parse_nih(root, csv, **kw)
    if dataset in ("shenzhen", "montgomery", "tb"):
        if csv is not None:
            raise ConfigError(f"dataset {dataset!r} takes no CSV (labels are in the file names); got {csv}")
        return _parse_tb(root, source=None if dataset == "tb" else dataset, **kw)
    if dataset == "csv":
        if csv is None:
            return _parse_generic(root, None, **kw)
        return _parse_generic(csv, root, **kw)
    raise ConfigError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")


def read_records(dataset: str, root, csv=None, *, verify_images: bool = False, require_images: bool = True,
                 **kw) -> pd.DataFrame:
    """Read any supported dataset by name (one of :data:`DATASETS`) into a records table.

    For "csv", ``csv`` is the label file and ``root`` the folder its paths are relative to; with
    ``csv=None``, ``root`` is the CSV file itself. Other keywords go to the reader (e.g. frontal_only).
    """
    parsed = _parse(dataset, root, csv, **kw)
    return _finish(parsed, require_images=require_images, verify_images=verify_images)


def check_dataset(dataset: str, root, csv=None, *, verify_images: bool = True, **kw) -> list[Problem]:
    """Every problem in a dataset, without raising: each row, each label, and each image decoded.

    For ``mococxr data check``. Returns an empty list for a clean dataset. A problem that stops
    parsing (no label file, missing columns) is returned alone, as nothing after it can be checked.
    """
    try:
        parsed = _parse(dataset, root, csv, **kw)
    except DatasetError as e:
        return e.problems
    problems = parsed.problems + _duplicate_problems(parsed) + _image_problems(parsed, verify=verify_images)
    return _ordered(problems)


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
        raise DataError(f"summarize: no column {missing[0]!r} in the records (task columns: "
                        f"{', '.join(task_columns(records)) or 'none'})")
    lines = [f"images {len(records)}, patients {records['patient_id'].nunique()}, "
             f"studies {records['study_id'].nunique()}"]
    if tasks:
        rows = []
        for t in tasks:
            v = records[t].to_numpy(float)
            rows.append({"task": t, "1": int((v == 1).sum()), "0": int((v == 0).sum()),
                         "-1": int((v == -1).sum()), "NaN": int(np.isnan(v).sum())})
        lines += ["", pd.DataFrame(rows).set_index("task").rename_axis(None).to_string(), ""]
    lines.append(f"view: {_counts(records['view'])}")
    lines.append(f"sex: {_counts(records['sex'])}")
    age = records["age"]
    if age.notna().any():
        lines.append(f"age: median {age.median():g}, range {age.min():g}-{age.max():g}, "
                     f"unknown {int(age.isna().sum())}")
    else:
        lines.append("age: unknown")
    return "\n".join(lines)
