"""Task sets, uncertainty/blank policies and the target matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mococxr.data.labels import TASK_SETS, apply_policy, label_matrix, resolve_tasks
from mococxr.data.records import BASE_COLUMNS, CHEXPERT_OBSERVATIONS, NIH_FINDINGS
from mococxr.errors import ConfigError, DataError

NAN = float("nan")


@pytest.fixture()
def records() -> pd.DataFrame:
    """A minimal records table: base columns, then three tasks with every label value kind."""
    n = 4
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i}.png" for i in range(n)],
            "path": [f"/x/img{i}.png" for i in range(n)],
            "patient_id": ["p0", "p0", "p1", "p2"],
            "study_id": ["s0", "s1", "s2", "s3"],
            "view": ["PA", "AP", "LATERAL", ""],
            "sex": ["F", "M", "", "F"],
            "age": [30.0, NAN, 50.0, 61.0],
        }
    )
    frame["Pleural Effusion"] = [1.0, 0.0, -1.0, NAN]
    frame["Edema"] = [-1.0, -1.0, NAN, 1.0]
    frame["Cardiomegaly"] = [0.0, 1.0, 0.0, 1.0]
    return frame


def assert_same(values, expected):
    np.testing.assert_array_equal(np.asarray(values, float), np.asarray(expected, float))


def test_task_sets():
    assert TASK_SETS["pleural_effusion"] == ["Pleural Effusion"]
    assert TASK_SETS["competition5"] == [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
    ]
    assert TASK_SETS["all14"] == CHEXPERT_OBSERVATIONS and len(TASK_SETS["all14"]) == 14
    assert TASK_SETS["nih14"] == NIH_FINDINGS and len(set(NIH_FINDINGS)) == 14
    assert TASK_SETS["tb"] == ["Tuberculosis"]
    assert TASK_SETS["pneumonia"] == ["Pneumonia"]
    assert TASK_SETS["cardiomegaly"] == ["Cardiomegaly"]


def test_resolve_tasks(records):
    assert resolve_tasks("pleural_effusion", records) == ["Pleural Effusion"]
    assert resolve_tasks("Edema, Pleural Effusion", records) == ["Edema", "Pleural Effusion"]
    assert resolve_tasks(["Cardiomegaly"], records) == ["Cardiomegaly"]
    assert resolve_tasks("competition5") == TASK_SETS["competition5"]  # no table: no validation
    with pytest.raises(
        DataError, match="no label column 'Atelectasis'.*Pleural Effusion, Edema, Cardiomegaly"
    ):
        resolve_tasks("competition5", records)
    with pytest.raises(DataError, match="'age'"):
        resolve_tasks("age", records)  # a base column is not a task
    with pytest.raises(ConfigError, match="no tasks"):
        resolve_tasks(" , ", records)
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_tasks("Edema,Edema", records)


@pytest.mark.parametrize(
    ("policy", "blank", "effusion", "edema"),
    [
        ("ignore", "negative", [1, 0, NAN, 0], [NAN, NAN, 0, 1]),
        ("ones", "negative", [1, 0, 1, 0], [1, 1, 0, 1]),
        ("zeros", "negative", [1, 0, 0, 0], [0, 0, 0, 1]),
        ("ignore", "unknown", [1, 0, NAN, NAN], [NAN, NAN, NAN, 1]),
        ("U-Ones", "unknown", [1, 0, 1, NAN], [1, 1, NAN, 1]),
    ],
)
def test_apply_policy(records, policy, blank, effusion, edema):
    out = apply_policy(records, ["Pleural Effusion", "Edema"], policy, blank=blank)
    assert_same(out["Pleural Effusion"], effusion)
    assert_same(out["Edema"], edema)
    assert_same(out["Cardiomegaly"], [0, 1, 0, 1])
    assert_same(records["Pleural Effusion"], [1, 0, -1, NAN])  # a copy: the input is unchanged
    assert list(out.columns) == list(records.columns)
    assert out[BASE_COLUMNS].equals(records[BASE_COLUMNS])


def test_apply_policy_default_is_u_ignore_blank_negative(records):
    out = apply_policy(records, "Pleural Effusion")
    assert_same(out["Pleural Effusion"], [1, 0, NAN, 0])


def test_apply_policy_per_task(records):
    out = apply_policy(
        records, ["Pleural Effusion", "Edema"], {"Edema": "ones"}, blank={"Pleural Effusion": "unknown"}
    )
    assert_same(out["Pleural Effusion"], [1, 0, NAN, NAN])  # ignore (default) and blank unknown
    assert_same(out["Edema"], [1, 1, 0, 1])  # ones, blank negative (default)
    with pytest.raises(ConfigError, match="'Cardiomegaly', which is not one of the tasks"):
        apply_policy(records, ["Edema"], {"Cardiomegaly": "ones"})
    with pytest.raises(ConfigError, match="unknown uncertainty policy 'maybe'"):
        apply_policy(records, ["Edema"], "maybe")
    with pytest.raises(ConfigError, match="unknown blank policy 'zero'"):
        apply_policy(records, ["Edema"], blank="zero")


def test_apply_policy_rejects_values_outside_the_scheme(records):
    records.loc[2, "Edema"] = 2.0
    with pytest.raises(DataError, match="'Edema' holds 2.0 at table row 2 \\(image img2.png\\)"):
        apply_policy(records, ["Edema"])


def test_label_matrix(records):
    with pytest.raises(DataError, match="'Pleural Effusion' still holds 1 uncertain"):
        label_matrix(records, "Pleural Effusion")
    y = label_matrix(
        apply_policy(records, "Pleural Effusion,Edema", blank="unknown"), ["Edema", "Pleural Effusion"]
    )
    assert y.dtype == np.float32 and y.shape == (4, 2) and y.flags.c_contiguous
    np.testing.assert_array_equal(y, np.array([[NAN, 1], [NAN, 0], [NAN, NAN], [1, NAN]], np.float32))
    assert_same(label_matrix(records, "cardiomegaly")[:, 0], [0, 1, 0, 1])
