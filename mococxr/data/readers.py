"""One reader per source format: CheXpert, NIH ChestX-ray14, the Shenzhen/Montgomery TB sets, generic CSVs.

Each reader only translates its source into the records table (see :mod:`mococxr.data.records`): a
``parse_*`` function returns the :class:`~mococxr.data.parsing.Parsed` table with the problems found
in its cells, and the ``read_*`` function adds the duplicate and image checks and raises them all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mococxr.data.parsing import (
    BASE_COLUMNS,
    SEX_CODES,
    DatasetError,
    Parsed,
    Problem,
    abspath,
    find_csv,
    finish,
    join_paths,
    list_files,
    parse_age,
    parse_labels,
    parse_sex,
    parse_view,
    problems_at,
    read_cells,
    records_table,
)
from mococxr.errors import ConfigError

# The 14 CheXpert observations, in the column order of CheXpert's CSVs: the one list the readers, the
# task sets (labels.py) and the phantom (which writes a CheXpert layout) share.
CHEXPERT_OBSERVATIONS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
NIH_FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
]
TB_SOURCES = {"shenzhen": "CHNCXR", "montgomery": "MCUCXR"}  # dataset name -> file name prefix

_CHEXPERT_CSVS = ("CheXpert-v1.0-small/train.csv", "CheXpert-v1.0/train.csv", "train.csv")
# sample.csv comes before the .gz tables: the sample folder ships the full metadata table without images.
_NIH_CSVS = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017.csv",
    "sample.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv.gz",
)
_NIH_COLUMNS = [
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
]
_TB_FOLDERS = (".", "CXR_png", "images")


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


def parse_chexpert(root, csv=None, *, frontal_only: bool = False) -> Parsed:
    root = abspath(root)
    file = find_csv(root, csv, _CHEXPERT_CSVS, "CheXpert")
    cells, lines, _ = read_cells(file, CHEXPERT_HEADER)
    source, problems = str(file), []

    relative = cells["Path"]
    ok = relative.str.contains(r"(?:^|/)patient\d+/study\d+/[^/]+$", regex=True)
    problems += problems_at(
        ~ok, relative, lines, source, "Path", "path {!r} is not of the form .../patientNNNNN/studyN/<image>"
    )
    study_id = relative.str.replace(r"^(?:.*/)?(patient\d+/study\d+)/[^/]+$", r"\1", regex=True).where(ok, "")
    patient_id = study_id.str.replace(r"/.*$", "", regex=True)

    orientation = cells["Frontal/Lateral"].str.lower()
    bad = ~orientation.isin(["frontal", "lateral"]).to_numpy()
    problems += problems_at(
        bad,
        cells["Frontal/Lateral"],
        lines,
        source,
        "Frontal/Lateral",
        "value {!r} is not Frontal or Lateral",
    )
    projection = cells["AP/PA"].str.upper()
    view = (
        projection.where(projection.isin(["AP", "PA"]), "FRONTAL")
        .mask(orientation.eq("lateral"), "LATERAL")
        .mask(bad, "")
    )

    records = records_table(
        image_id=relative,
        path=join_paths(_chexpert_base(root, relative), relative),
        patient_id=patient_id,
        study_id=study_id,
        view=view,
        sex=parse_sex(cells["Sex"], lines, source, "Sex", problems),
        age=parse_age(cells["Age"], lines, source, "Age", problems),
        labels=parse_labels(cells, CHEXPERT_OBSERVATIONS, lines, source, problems),
    )
    if frontal_only:
        keep = orientation.eq("frontal").to_numpy()
        records, lines = records[keep].reset_index(drop=True), lines[keep]
    return Parsed(records, lines, source, "Path", problems)


def read_chexpert(
    root, csv=None, *, frontal_only: bool = False, verify_images: bool = False, require_images: bool = True
) -> pd.DataFrame:
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
    parsed = parse_chexpert(root, csv, frontal_only=frontal_only)
    return finish(parsed, require_images=require_images, verify_images=verify_images)


# ---------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def _nih_image_folders(root: Path) -> list[Path]:
    """NIH ships images in ``images/`` or, split in twelve archives, ``images_001/images/`` ..."""
    return [root / "images", *sorted(root.glob("images_*/images"))]


def _nih_findings(findings: pd.Series, lines, source: str, problems: list[Problem]) -> dict[str, np.ndarray]:
    """One 0/1 column per NIH finding from the ``Finding Labels`` cells; bad cells go to ``problems``."""
    # One substring test per finding on '|'-padded text; whatever is left after removing every known
    # name is an unknown token. Faster here than str.get_dummies on 112k rows.
    padded = "|" + findings + "|"
    labels = {f: padded.str.contains(f"|{f}|", regex=False).to_numpy(float) for f in NIH_FINDINGS}
    names = "|".join(re.escape(f) for f in [*NIH_FINDINGS, "No Finding"])
    unknown = padded.str.replace(rf"\|(?:{names})(?=\|)", "", regex=True).ne("|") & findings.ne("")
    problems += problems_at(
        unknown,
        findings,
        lines,
        source,
        "Finding Labels",
        "unknown finding in {!r} (expected NIH finding names joined by '|', or 'No Finding')",
    )
    mixed = padded.str.contains("|No Finding|", regex=False).to_numpy() & (sum(labels.values()) > 0)
    problems += problems_at(
        mixed, findings, lines, source, "Finding Labels", "{!r} combines 'No Finding' with findings"
    )
    problems += problems_at(
        findings.eq(""),
        findings,
        lines,
        source,
        "Finding Labels",
        "blank (NIH writes 'No Finding' when there is none)",
    )
    return labels


def _nih_locations(root: Path, problems: list[Problem]) -> dict[str, str]:
    """Each image name's folder; an image found in two folders goes to ``problems``."""
    located: dict[str, str] = {}
    for folder in _nih_image_folders(root):
        for name in list_files(folder):
            if name in located:
                problems.append(
                    Problem(
                        str(folder / name),
                        None,
                        "Image Index",
                        f"image also found in {located[name]}; keep one copy",
                    )
                )
            else:
                located[name] = str(folder)
    return located


def parse_nih(root, csv=None) -> Parsed:
    root = abspath(root)
    file = find_csv(root, csv, _NIH_CSVS, "NIH ChestX-ray14")
    cells, lines, _ = read_cells(file, _NIH_COLUMNS)
    source, problems = str(file), []

    image_id = cells["Image Index"]
    problems += problems_at(image_id.eq(""), image_id, lines, source, "Image Index", "blank image name")

    findings = cells["Finding Labels"]
    labels = _nih_findings(findings, lines, source, problems)

    patient_id = cells["Patient ID"]
    problems += problems_at(patient_id.eq(""), patient_id, lines, source, "Patient ID", "blank patient id")

    located = _nih_locations(root, problems)
    folder = image_id.map(located).fillna(str(root / "images"))

    records = records_table(
        image_id=image_id,
        path=folder + "/" + image_id,
        patient_id=patient_id,
        study_id=image_id.str.replace(r"\.png$", "", regex=True),  # one image per NIH follow-up visit
        view=parse_view(cells["View Position"], lines, source, "View Position", problems),
        sex=parse_sex(cells["Patient Gender"], lines, source, "Patient Gender", problems),
        age=parse_age(cells["Patient Age"], lines, source, "Patient Age", problems),
        labels=labels,
    )
    return Parsed(records, lines, source, "Image Index", problems)


def read_nih(root, csv=None, *, verify_images: bool = False, require_images: bool = True) -> pd.DataFrame:
    """Read NIH ChestX-ray14 (``Data_Entry_2017*.csv[.gz]`` or the sample's ``sample.csv``).

    ``csv`` defaults to the first of Data_Entry_2017_v2020.csv, Data_Entry_2017.csv, sample.csv and
    the .csv.gz tables under root. Images are looked up in root/images/ and root/images_NNN/images/.
    One column per NIH finding (:data:`NIH_FINDINGS`) holding 1.0 or 0.0, never NaN; study_id is the
    image name without extension (NIH has one image per follow-up visit). ``require_images=False``
    reads the metadata table alone (paths then point where the image would be).
    """
    parsed = parse_nih(root, csv)
    return finish(parsed, require_images=require_images, verify_images=verify_images)


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
    sex_value = SEX_CODES.get((sex.group(1) or sex.group(2)).lower(), "") if sex else ""
    return sex_value, float(age.group(1)) if age else float("nan")


def parse_tb(root, *, source: str | None = None) -> Parsed:
    root = abspath(root)
    if source is not None and source not in TB_SOURCES:
        raise ConfigError(f"unknown TB source {source!r} (expected one of {sorted(TB_SOURCES)} or None)")
    prefixes = [TB_SOURCES[source]] if source else list(TB_SOURCES.values())
    pattern = re.compile(rf"^({'|'.join(prefixes)})_(\d+)_(.*)\.png$", re.IGNORECASE)
    problems: list[Problem] = []
    found: dict[str, str] = {}
    for sub in _TB_FOLDERS:
        folder = os.path.normpath(root / sub)
        for name in sorted(list_files(folder)):
            if not pattern.match(name):
                continue
            if name in found:
                problems.append(
                    Problem(
                        os.path.join(folder, name),
                        None,
                        "Tuberculosis",
                        f"duplicate image: also in {found[name]}",
                    )
                )
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
            problems.append(
                Problem(
                    paths[-1],
                    None,
                    "Tuberculosis",
                    f"label {digit!r} before .png is not 0 (normal) or 1 (tuberculosis)",
                )
            )
        labels.append(float(digit) if digit in ("0", "1") else np.nan)
        stems.append(f"{prefix.upper()}_{number}")
        view.append("PA" if prefix.upper() == "MCUCXR" else "FRONTAL")  # Montgomery is all PA
        s, a = _clinical_reading(root, name[:-4])
        sex.append(s)
        age.append(a)
    records = records_table(names, paths, stems, stems, view, sex, age, {"Tuberculosis": labels})
    return Parsed(records, None, str(root), "Tuberculosis", problems)


def read_tb(root, *, verify_images: bool = False, source: str | None = None) -> pd.DataFrame:
    """Read the Shenzhen (``CHNCXR_0001_0.png``) and/or Montgomery (``MCUCXR_0001_0.png``) TB sets.

    The digit before the extension is the Tuberculosis label. Images may sit in root, root/CXR_png/
    or root/images/. One image per patient, so patient_id = study_id = "CHNCXR_0001". ``source``
    ("shenzhen" or "montgomery") keeps one set; None keeps both.
    """
    return finish(parse_tb(root, source=source), require_images=True, verify_images=verify_images)


# ---------------------------------------------------------------------------------------------------
# Generic CSV


def parse_generic(csv, root=None) -> Parsed:
    file = abspath(csv)
    if not file.is_file():
        raise DatasetError([Problem(str(file), None, "", "CSV file not found")])
    base = abspath(root) if root is not None else file.parent
    cells, lines, header = read_cells(file, ["path"])
    source, problems = str(file), []
    tasks = [c for c in header if c not in BASE_COLUMNS and c and not c.startswith("Unnamed:")]

    relative = cells["path"]
    problems += problems_at(relative.eq(""), relative, lines, source, "path", "blank path")
    image_id = (
        cells["image_id"].where(cells["image_id"].ne(""), relative) if "image_id" in cells else relative
    )
    # Without patient ids every image is its own patient: splits cannot then keep a patient together.
    patient_id = (
        cells["patient_id"].where(cells["patient_id"].ne(""), image_id) if "patient_id" in cells else image_id
    )
    study_id = (
        cells["study_id"].where(cells["study_id"].ne(""), image_id) if "study_id" in cells else image_id
    )
    blank = pd.Series([""] * len(cells), dtype=str)
    records = records_table(
        image_id=image_id,
        path=join_paths(str(base), relative),
        patient_id=patient_id,
        study_id=study_id,
        view=parse_view(cells.get("view", blank), lines, source, "view", problems),
        sex=parse_sex(cells.get("sex", blank), lines, source, "sex", problems),
        age=parse_age(cells.get("age", blank), lines, source, "age", problems),
        labels=parse_labels(cells, tasks, lines, source, problems),
    )
    return Parsed(records, lines, source, "path", problems)


def read_csv_records(
    csv, root=None, *, verify_images: bool = False, require_images: bool = True
) -> pd.DataFrame:
    """Read a generic CSV: a ``path`` column plus label columns, one row per image.

    Optional columns: ``image_id`` (default: path as written), ``patient_id`` and ``study_id``
    (default: the image id, i.e. each image its own patient), ``view``, ``sex``, ``age``. Every other
    named column is a task holding 1, 0, -1 or blank ("1.0" style accepted); unnamed columns (a
    saved pandas index) are ignored. Relative paths are taken relative to ``root`` (default: the
    CSV's folder).
    """
    return finish(parse_generic(csv, root), require_images=require_images, verify_images=verify_images)
