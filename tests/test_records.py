"""Dataset readers: CheXpert, NIH, TB and generic CSVs into one records table, and every error path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mococxr.config import DATASETS
from mococxr.data.labels import apply_policy
from mococxr.data.records import (
    BASE_COLUMNS,
    CHEXPERT_OBSERVATIONS,
    NIH_FINDINGS,
    DatasetError,
    Problem,
    check_dataset,
    read_chexpert,
    read_csv_records,
    read_nih,
    read_records,
    read_tb,
    summarize,
    task_columns,
)
from mococxr.errors import ConfigError, DataError

NAN = float("nan")


def write_image(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def same(values, expected) -> bool:
    """Element-wise equality where NaN equals NaN."""
    return np.array_equal(np.asarray(values, float), np.asarray(expected, float), equal_nan=True)


# --------------------------------------------------------------------------------------------------
# CheXpert

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
# (path, sex, age, frontal/lateral, ap/pa, Pleural Effusion, Cardiomegaly); other observations blank.
CHEXPERT_ROWS = [
    ("patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "1.0", "-1.0"),
    ("patient00001/study1/view2_lateral.jpg", "Female", "68", "Lateral", "", "0.0", ""),
    ("patient00002/study1/view1_frontal.jpg", "Male", "40", "Frontal", "PA", "-1.0", "1.0"),
    ("patient00002/study2/view1_frontal.jpg", "Unknown", "", "Frontal", "", "", "0.0"),
]


def chexpert_row(path, sex, age, orientation, projection, effusion, cardiomegaly) -> list[str]:
    labels = {"Pleural Effusion": effusion, "Cardiomegaly": cardiomegaly}
    return [
        f"CheXpert-v1.0-small/train/{path}",
        sex,
        age,
        orientation,
        projection,
        *(labels.get(o, "") for o in CHEXPERT_OBSERVATIONS),
    ]


@pytest.fixture()
def chexpert(tmp_path) -> Path:
    """A CheXpert-layout root with four tiny JPEGs and a train.csv holding every value kind."""
    rows = [chexpert_row(*r) for r in CHEXPERT_ROWS]
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_HEADER, rows)
    for i, row in enumerate(rows):
        write_image(tmp_path / row[0], value=40 * i)
    return tmp_path


def rewrite_chexpert(root: Path, edit) -> Path:
    """Apply ``edit`` to the rows (lists of cells) of the fixture's train.csv and write it back."""
    file = root / "CheXpert-v1.0-small" / "train.csv"
    frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    header, rows = edit(list(frame.columns), frame.to_numpy().tolist())
    return write_csv(file, header, rows)


def test_chexpert_table(chexpert):
    records = read_chexpert(chexpert, verify_images=True)
    assert list(records.columns) == BASE_COLUMNS + CHEXPERT_OBSERVATIONS
    assert task_columns(records) == CHEXPERT_OBSERVATIONS
    assert records["image_id"].iloc[0] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert records["path"].iloc[0] == str(chexpert / records["image_id"].iloc[0])
    assert records["patient_id"].tolist() == ["patient00001", "patient00001", "patient00002", "patient00002"]
    assert records["study_id"].tolist() == [
        "patient00001/study1",
        "patient00001/study1",
        "patient00002/study1",
        "patient00002/study2",
    ]
    assert records["view"].tolist() == ["AP", "LATERAL", "PA", "FRONTAL"]
    assert records["sex"].tolist() == ["F", "F", "M", ""]
    assert same(records["age"], [68, 68, 40, NAN])
    # Raw table: -1 kept, blank kept as NaN (unknown) until a policy decides.
    assert same(records["Pleural Effusion"], [1, 0, -1, NAN])
    assert same(records["Cardiomegaly"], [-1, NAN, 1, 0])
    assert records["Edema"].isna().all()


@pytest.mark.parametrize(
    ("policy", "blank", "effusion", "cardiomegaly"),
    [
        ("ignore", "negative", [1, 0, NAN, 0], [NAN, 0, 1, 0]),
        ("ones", "negative", [1, 0, 1, 0], [1, 0, 1, 0]),
        ("zeros", "negative", [1, 0, 0, 0], [0, 0, 1, 0]),
        ("ignore", "unknown", [1, 0, NAN, NAN], [NAN, NAN, 1, 0]),
        ("ones", "unknown", [1, 0, 1, NAN], [1, NAN, 1, 0]),
        ("zeros", "unknown", [1, 0, 0, NAN], [0, NAN, 1, 0]),
    ],
)
def test_chexpert_policies(chexpert, policy, blank, effusion, cardiomegaly):
    records = read_chexpert(chexpert)
    out = apply_policy(records, ["Pleural Effusion", "Cardiomegaly"], policy, blank=blank)
    assert same(out["Pleural Effusion"], effusion)
    assert same(out["Cardiomegaly"], cardiomegaly)
    assert same(records["Pleural Effusion"], [1, 0, -1, NAN])  # the input table is left alone


def test_chexpert_frontal_only_and_csv_choice(chexpert):
    frontal = read_chexpert(chexpert, frontal_only=True)
    assert frontal["view"].tolist() == ["AP", "PA", "FRONTAL"]
    assert frontal.index.tolist() == [0, 1, 2]
    # A relative csv is taken relative to root; valid.csv in its usual place.
    valid = chexpert / "CheXpert-v1.0-small" / "valid.csv"
    valid.write_text(
        (chexpert / "CheXpert-v1.0-small" / "train.csv").read_text().splitlines()[0]
        + "\n"
        + ",".join(chexpert_row(*CHEXPERT_ROWS[2]))
        + "\n"
    )
    one = read_chexpert(chexpert, "CheXpert-v1.0-small/valid.csv")
    assert one["patient_id"].tolist() == ["patient00002"]
    # Root given as the CheXpert folder itself still resolves the CSV's paths.
    inner = read_chexpert(chexpert / "CheXpert-v1.0-small", verify_images=True)
    assert inner["path"].tolist() == read_chexpert(chexpert)["path"].tolist()


def test_chexpert_missing_label_file(tmp_path):
    with pytest.raises(DataError, match="no CheXpert label file found"):
        read_chexpert(tmp_path)


def test_error_missing_column(chexpert):
    file = rewrite_chexpert(chexpert, lambda h, rows: (h[:10] + h[11:], [r[:10] + r[11:] for r in rows]))
    with pytest.raises(DataError) as err:
        read_chexpert(chexpert)
    assert f"{file}, line 1, field 'Edema': missing column" in str(err.value)


def test_error_unknown_label_value(chexpert):
    def edit(header, rows):
        rows[2][header.index("Cardiomegaly")] = "2"
        return header, rows

    file = rewrite_chexpert(chexpert, edit)
    with pytest.raises(DataError) as err:
        read_chexpert(chexpert)
    assert f"{file}, line 4, field 'Cardiomegaly': unknown label value '2'" in str(err.value)
    assert err.value.problems[0].row == 4


def test_error_missing_image(chexpert):
    (chexpert / "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg").unlink()
    file = chexpert / "CheXpert-v1.0-small" / "train.csv"
    with pytest.raises(DataError) as err:
        read_chexpert(chexpert)
    assert f"{file}, line 4, field 'Path': image not found: " in str(err.value)
    assert read_chexpert(chexpert, require_images=False).shape[0] == 4


def test_error_duplicate_image(chexpert):
    file = rewrite_chexpert(chexpert, lambda h, rows: (h, [*rows, rows[1]]))
    with pytest.raises(DataError) as err:
        read_chexpert(chexpert)
    message = str(err.value)
    assert f"{file}, line 6, field 'Path': duplicate image" in message
    assert "first on line 3" in message


def test_reader_lists_every_problem_then_counts(chexpert):
    def edit(header, rows):
        bad = [
            chexpert_row(f"patient{i:05d}/study1/view1_frontal.jpg", "Male", "50", "Frontal", "PA", "yes", "")
            for i in range(10, 35)
        ]
        return header, rows + bad

    rewrite_chexpert(chexpert, edit)
    problems = check_dataset("chexpert", chexpert)
    # 25 rows: each has a bad label and a missing image.
    assert len(problems) == 50
    with pytest.raises(DatasetError) as err:
        read_chexpert(chexpert)
    message = str(err.value)
    assert message.startswith("50 problems in the dataset:")
    assert message.count("\n  /") == 20
    assert "... and 30 more" in message
    assert len(err.value.problems) == 50


# --------------------------------------------------------------------------------------------------
# Generic CSV (and the truncated-image and check_dataset cases, on PNGs)


@pytest.fixture()
def generic(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_image(tmp_path / "imgs" / name)
    return write_csv(
        tmp_path / "labels.csv",
        ["path", "patient_id", "view", "sex", "age", "Pneumonia", "Effusion"],
        [
            ["imgs/a.png", "p1", "PA", "F", "30", "1.0", "1"],
            ["imgs/b.png", "p1", "ap", "male", "", "0.0", "-1"],
            ["imgs/c.png", "p2", "", "", "51.5", "-1.0", ""],
            ["imgs/d.png", "", "Lateral", "M", "7", "", "0"],
        ],
    )


def test_generic_csv(generic):
    records = read_csv_records(generic, verify_images=True)
    assert list(records.columns) == BASE_COLUMNS + ["Pneumonia", "Effusion"]
    assert records["image_id"].tolist() == ["imgs/a.png", "imgs/b.png", "imgs/c.png", "imgs/d.png"]
    assert records["path"].tolist() == [str(generic.parent / "imgs" / f"{n}.png") for n in "abcd"]
    assert records["patient_id"].tolist() == ["p1", "p1", "p2", "imgs/d.png"]
    assert records["study_id"].tolist() == records["image_id"].tolist()
    assert records["view"].tolist() == ["PA", "AP", "", "LATERAL"]
    assert records["sex"].tolist() == ["F", "M", "", "M"]
    assert same(records["age"], [30, NAN, 51.5, 7])
    assert same(records["Pneumonia"], [1, 0, -1, NAN])
    assert same(records["Effusion"], [1, -1, NAN, 0])
    pd.testing.assert_frame_equal(read_records("csv", generic.parent, generic), records)
    pd.testing.assert_frame_equal(read_records("csv", generic), records)


def test_generic_csv_root(generic, tmp_path):
    moved = tmp_path / "elsewhere" / "labels.csv"
    moved.parent.mkdir()
    generic.rename(moved)
    with pytest.raises(DataError, match="none of the 4 listed images exists"):
        read_csv_records(moved)
    assert read_csv_records(moved, root=tmp_path)["path"].iloc[0] == str(tmp_path / "imgs" / "a.png")


def test_error_truncated_png(generic):
    truncate(generic.parent / "imgs" / "c.png")
    assert len(read_csv_records(generic)) == 4  # existence only: the decode is what finds it
    with pytest.raises(DataError) as err:
        read_csv_records(generic, verify_images=True)
    assert f"{generic}, line 4, field 'path': cannot decode image {generic.parent / 'imgs' / 'c.png'}" in str(
        err.value
    )


def test_check_dataset_reports_all_problems(generic):
    truncate(generic.parent / "imgs" / "a.png")
    (generic.parent / "imgs" / "b.png").unlink()
    text = generic.read_text().replace("51.5,-1.0,", "51.5,maybe,")
    generic.write_text(text)

    problems = check_dataset("csv", generic.parent, generic)
    assert [(p.row, p.field) for p in problems] == [(2, "path"), (3, "path"), (4, "Pneumonia")]
    assert all(p.file == str(generic) for p in problems)
    assert "cannot decode image" in problems[0].message
    assert problems[1].message.startswith("image not found")
    assert "unknown label value 'maybe'" in problems[2].message
    assert str(problems[2]) == f"{generic}, line 4, field 'Pneumonia': {problems[2].message}"
    with pytest.raises(DataError, match="3 problems in the dataset"):
        read_csv_records(generic, verify_images=True)
    assert check_dataset("csv", generic.parent, generic, verify_images=False)[0].row == 3


def test_generic_csv_bad_metadata(generic):
    generic.write_text(generic.read_text().replace("PA,F,30", "OBLIQUE,X,old"))
    with pytest.raises(DataError) as err:
        read_csv_records(generic)
    message = str(err.value)
    for column, value in (("view", "OBLIQUE"), ("sex", "X"), ("age", "old")):
        assert f"line 2, field '{column}': " in message and repr(value) in message


# --------------------------------------------------------------------------------------------------
# NIH layout on a written table (header quirk, trailing commas, split image folders)

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def write_nih(root: Path, lines: list[str]) -> Path:
    file = root / "Data_Entry_2017.csv"
    file.write_text("\n".join([NIH_HEADER, *lines]) + "\n")
    return file


def test_nih_header_quirk_and_folders(tmp_path):
    write_image(tmp_path / "images_001" / "images" / "00000001_000.png")
    write_image(tmp_path / "images_002" / "images" / "00000002_000.png")
    write_image(tmp_path / "images_002" / "images" / "00000002_001.png")
    write_nih(
        tmp_path,
        [
            "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA,2682,2749,0.143,0.143",
            "00000002_000.png,No Finding,0,2,081Y,F,AP,2500,2048,0.168,0.168,",  # 2017 file: trailing comma
            "",
            "00000002_001.png,Pneumonia,1,2,81,F,AP,2500,2048,0.168,0.168",
        ],
    )
    records = read_nih(tmp_path, verify_images=True)
    assert list(records.columns) == BASE_COLUMNS + NIH_FINDINGS
    assert records["path"].tolist() == [
        str(tmp_path / "images_001/images/00000001_000.png"),
        str(tmp_path / "images_002/images/00000002_000.png"),
        str(tmp_path / "images_002/images/00000002_001.png"),
    ]
    assert records["patient_id"].tolist() == ["1", "2", "2"]
    assert records["study_id"].tolist() == ["00000001_000", "00000002_000", "00000002_001"]
    assert records["view"].tolist() == ["PA", "AP", "AP"]
    assert same(records["age"], [58, 81, 81])
    assert same(records["Cardiomegaly"], [1, 0, 0])
    assert same(records["Emphysema"], [1, 0, 0])
    assert same(records["Pneumonia"], [0, 0, 1])
    assert not records[NIH_FINDINGS].isna().any().any()
    assert records[NIH_FINDINGS].to_numpy().sum() == 3


def test_nih_errors_name_line_and_field(tmp_path):
    write_image(tmp_path / "images" / "00000001_000.png")
    file = write_nih(
        tmp_path,
        [
            "00000001_000.png,Cardiomegaly|Pneumonitis,0,1,58,M,PA,2682,2749,0.143,0.143",
            "00000001_000.png,No Finding|Mass,1,1,58,M,PA,2682,2749,0.143,0.143",
        ],
    )
    problems = check_dataset("nih", tmp_path)
    assert [(p.row, p.field) for p in problems] == [
        (2, "Finding Labels"),
        (3, "Finding Labels"),
        (3, "Image Index"),
    ]
    assert all(p.file == str(file) for p in problems)
    assert "Pneumonitis" in problems[0].message
    assert "combines 'No Finding' with findings" in problems[1].message
    assert "duplicate image '00000001_000.png' (first on line 2)" in problems[2].message


# --------------------------------------------------------------------------------------------------
# Shenzhen / Montgomery


def test_tb_reader(tmp_path):
    write_image(tmp_path / "CXR_png" / "CHNCXR_0001_0.png")
    write_image(tmp_path / "CXR_png" / "CHNCXR_0002_1.png")
    write_image(tmp_path / "MCUCXR_0001_1.png")
    (tmp_path / "CXR_png" / "Thumbs.db").write_bytes(b"not an image")
    (tmp_path / "ClinicalReadings").mkdir()
    (tmp_path / "ClinicalReadings" / "CHNCXR_0002_1.txt").write_text(
        "female 35yrs\nPTB in the left upper field\n"
    )
    (tmp_path / "ClinicalReadings" / "MCUCXR_0001_1.txt").write_text(
        "Patient's Sex: M\nPatient's Age: 047Y\n"
    )

    records = read_tb(tmp_path, verify_images=True)
    assert list(records.columns) == BASE_COLUMNS + ["Tuberculosis"]
    assert records["image_id"].tolist() == ["CHNCXR_0001_0.png", "CHNCXR_0002_1.png", "MCUCXR_0001_1.png"]
    assert records["path"].tolist() == [
        str(tmp_path / "CXR_png" / "CHNCXR_0001_0.png"),
        str(tmp_path / "CXR_png" / "CHNCXR_0002_1.png"),
        str(tmp_path / "MCUCXR_0001_1.png"),
    ]
    assert records["patient_id"].tolist() == ["CHNCXR_0001", "CHNCXR_0002", "MCUCXR_0001"]
    assert same(records["Tuberculosis"], [0, 1, 1])
    assert records["sex"].tolist() == ["", "F", "M"]
    assert same(records["age"], [NAN, 35, 47])
    assert read_records("shenzhen", tmp_path)["image_id"].tolist() == [
        "CHNCXR_0001_0.png",
        "CHNCXR_0002_1.png",
    ]
    assert read_records("montgomery", tmp_path)["image_id"].tolist() == ["MCUCXR_0001_1.png"]


def test_tb_errors(tmp_path):
    with pytest.raises(DataError, match="no CHNCXR_NNNN_<0|1>.png"):
        read_records("shenzhen", tmp_path)
    write_image(tmp_path / "images" / "CHNCXR_0001_0.png")
    write_image(tmp_path / "CHNCXR_0001_0.png")
    write_image(tmp_path / "images" / "CHNCXR_0002_x.png")
    truncate(write_image(tmp_path / "images" / "CHNCXR_0003_1.png", size=64))
    problems = check_dataset("tb", tmp_path)
    by_file = {Path(p.file).name: p.message for p in problems}
    assert len(problems) == 3
    assert "duplicate image" in by_file["CHNCXR_0001_0.png"]
    assert "label 'x'" in by_file["CHNCXR_0002_x.png"]
    assert "cannot decode image" in by_file["CHNCXR_0003_1.png"]
    assert all(p.field == "Tuberculosis" and p.row is None for p in problems)


def test_read_records_rejects_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'mimic'"):
        read_records("mimic", tmp_path)


def test_every_configured_dataset_has_a_reader(tmp_path):
    """config.DATASETS is the one list of names: each reaches a reader (which then finds no data here)."""
    for name in DATASETS:
        with pytest.raises(DataError) as err:
            read_records(name, tmp_path / "empty")
        assert "unknown dataset" not in str(err.value), name


def test_summarize(chexpert):
    text = summarize(read_chexpert(chexpert), ["Pleural Effusion", "Cardiomegaly"])
    assert text.splitlines()[0] == "images 4, patients 2, studies 3"
    table = {
        line.split()[0]: line.split()[-4:]
        for line in text.splitlines()
        if line.startswith(("Pleural", "Card"))
    }
    assert table == {"Pleural": ["1", "1", "1", "1"], "Cardiomegaly": ["1", "1", "1", "1"]}
    assert "view: AP 1, LATERAL 1, PA 1, FRONTAL 1" in text
    assert "sex: F 2, M 1, unknown 1" in text
    with pytest.raises(DataError, match="'Edemaa'"):
        summarize(read_chexpert(chexpert), ["Edemaa"])


# --------------------------------------------------------------------------------------------------
# The real NIH sample


@pytest.mark.realdata
def test_nih_sample_reads_and_decodes_every_image(nih_sample):
    records = read_nih(nih_sample, verify_images=True)
    assert len(records) == 1000
    assert records["patient_id"].nunique() == 682
    assert records["Pneumonia"].sum() == 500
    assert records["view"].value_counts().to_dict() == {"AP": 567, "PA": 433}
    assert records[NIH_FINDINGS].isin([0.0, 1.0]).all().all()
    assert records["Infiltration"].sum() == 187
    assert (records[NIH_FINDINGS].sum(axis=1) == 0).sum() == 500  # the "No Finding" half
    assert all(Path(p).is_file() for p in records["path"])


@pytest.mark.realdata
def test_nih_full_metadata_table(nih_sample):
    table = "Data_Entry_2017_v2020.csv.gz"
    records = read_nih(nih_sample, table, require_images=False)
    assert len(records) == 112_120
    assert records["patient_id"].nunique() == 30_805
    assert records["image_id"].is_unique
    assert not records[NIH_FINDINGS].isna().any().any()
    assert set(records["view"]) == {"AP", "PA"}
    assert records["age"].notna().all()
    with pytest.raises(DataError, match="require_images=False"):
        read_nih(nih_sample, table)


def test_problem_str_without_row():
    assert str(Problem("a.png", None, "Tuberculosis", "bad")) == "a.png, field 'Tuberculosis': bad"
