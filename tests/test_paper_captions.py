"""The comparison mark's statistic, Table 2's scheduler choice and the caption lines, on hand-made inputs
(no MLflow: the families that read them from runs are tests/test_report_paper.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mococxr.report import published as pub
from mococxr.report.compare import DIFFERS_MARK, Comparison, differs, interval_se, z_difference
from mococxr.report.paper import PaperNotes, Table2Row
from mococxr.report.paper_captions import (
    best_at_last_line,
    comparable_reasons,
    corrections_line,
    epochs_line,
    lr_line,
    policy_line,
    pretraining_data_line,
    probe_gap_line,
    protocol_block,
    published_lines,
)
from mococxr.report.paper_tables import FALLBACK_OBJECTIVE, OBJECTIVE, choose_schedulers, theirs

IMAGENET = PaperNotes(baseline="imagenet", moco_start="imagenet")


# --------------------------------------------------------------------------- the mark


def test_z_uses_both_intervals_on_known_numbers():
    # SE = width / (2 x 1.96): 0.1 / 3.92 and 0.08 / 3.92, so z = 0.05 x 3.92 / sqrt(0.1^2 + 0.08^2) = 1.5305
    assert interval_se(0.80, 0.90) == pytest.approx(0.1 / 3.92, rel=1e-4)
    assert z_difference((0.85, 0.80, 0.90), (0.80, 0.76, 0.84)) == pytest.approx(1.5305, abs=2e-4)
    assert (
        differs((0.85, 0.80, 0.90), (0.80, 0.76, 0.84)) is False
    )  # the point 0.80 lies inside ours, z < 1.96
    # z = -0.1 x 3.92 / sqrt(0.04^2 + 0.08^2) = -4.383: differs, whichever side
    assert z_difference((0.80, 0.78, 0.82), (0.90, 0.86, 0.94)) == pytest.approx(-4.3827, abs=2e-4)
    assert differs((0.80, 0.78, 0.82), (0.90, 0.86, 0.94)) is True
    # outside our interval, yet not different once the published interval counts: the old mark fired here
    assert differs((0.85, 0.83, 0.87), (0.80, 0.72, 0.88)) is False
    # ours zero wide (every replicate alike): the published interval alone; published zero wide: not compared
    assert z_difference((1.0, 1.0, 1.0), (0.85, 0.808, 0.884)) == pytest.approx(0.15 * 3.92 / 0.076, rel=1e-3)
    assert differs((0.9, 0.85, 0.95), (0.942, 0.921, 0.921)) is None
    assert differs((math.nan, math.nan, math.nan), (0.8, 0.7, 0.9)) is None


def test_the_mark_fires_in_about_5_percent_of_cells_under_perfect_replication():
    """Two studies of the same AUC on independent test sets: the mark fires ~5%, the old 'point outside our
    interval' rule ~17%."""
    rng, se = np.random.default_rng(0), 0.02
    a, b = rng.normal(0.8, se, size=(2, 20000))
    marks = [
        differs((x, x - 1.96 * se, x + 1.96 * se), (y, y - 1.96 * se, y + 1.96 * se))
        for x, y in zip(a, b, strict=True)
    ]
    assert 0.04 < np.mean(marks) < 0.06
    assert 0.15 < np.mean(np.abs(a - b) > 1.96 * se) < 0.18


def test_a_comparison_counts_its_cells_and_says_the_chance_count():
    comparison = Comparison()
    row = SimpleNamespace(point=0.80, lo=0.78, hi=0.82)
    assert theirs(pub.Published(0.90, 0.86, 0.94), row, comparison) == f"0.900 (0.860, 0.940) {DIFFERS_MARK}"
    assert theirs(pub.Published(0.81, 0.77, 0.85), row, comparison) == "0.810 (0.770, 0.850)"
    assert theirs(pub.Published(0.81, 0.81, 0.81), row, comparison) == "0.810 (0.810, 0.810)"  # no interval
    assert (
        theirs(pub.Published(0.81, 0.77, 0.85), None, comparison) == "0.810 (0.770, 0.850)"
    )  # no cell of ours
    assert (
        theirs(pub.Published(0.90, 0.86, 0.94), row, None) == "0.900 (0.860, 0.940)"
    )  # not comparable: no mark
    assert (comparison.compared, comparison.marked) == (2, 1)
    assert "2 cells compared, so about 0.1 would be marked by chance alone" in comparison.caption()
    assert (
        "; 1 marked." in comparison.caption()
        and "without an interval are not compared" in comparison.caption()
    )


def test_no_mark_line_where_the_caption_says_not_comparable():
    for notes, phantom in (
        (IMAGENET, True),
        (PaperNotes(baseline="random", moco_start="imagenet"), False),
        (PaperNotes(baseline="imagenet", moco_start="random"), False),
    ):
        assert comparable_reasons(notes, phantom=phantom)
        lines = published_lines("Table 1", notes, phantom=phantom, comparison=Comparison(compared=3))
        assert "not comparable" in lines[1] and not any(DIFFERS_MARK in x for x in lines)
    assert (
        comparable_reasons(
            PaperNotes(baseline="random", moco_start="imagenet"), phantom=False, baseline=False
        )
        == []
    )
    lines = published_lines("Table 1", IMAGENET, phantom=False, comparison=Comparison(compared=24, marked=2))
    assert lines[-1].startswith(f"{DIFFERS_MARK} after a published number") and "about 1.2" in lines[-1]


def test_the_corrected_cells_footnote_names_each_cell_and_matches_the_table():
    for c in pub.CORRECTIONS:
        assert pub.competition(c.task, c.protocol, c.fraction)[c.column] == c.used
    line = corrections_line("Appendix Table 5")
    assert (
        "Pleural Effusion, 1%, baseline: printed (0.856, 0.886), used (0.828, 0.886) from Appendix Table 1"
        in line
    )
    assert "Pleural Effusion, 100%, moco: printed (0.921, 0.921), used (0.921, 0.962)" in line
    assert (
        corrections_line("Appendix Table 5", ["Edema"]) is None
        and corrections_line("Appendix Table 4") is None
    )
    assert corrections_line("Appendix Table 5", ["pleural_effusion"]) == line


# --------------------------------------------------------------------------- Table 2's choice


def _row(lr, scheduler, trial, objective=None):
    return Table2Row(
        label=f"{lr:g}-{scheduler}",
        lr=lr,
        scheduler=scheduler,
        trial=trial,
        pretrain_run_id="p",
        registered_model="m",
        version="1",
        epoch=1,
        val_objective=objective,
    )


def test_the_scheduler_is_chosen_per_lr_on_validation():
    rows = [
        _row(1e-3, "cosine", 0, 0.7),
        _row(1e-3, "milestone", 1, 0.8),
        _row(1e-4, "cosine", 2, 0.9),
        _row(1e-4, "milestone", 3),
        _row(1e-5, "cosine", 4),
        _row(1e-5, "milestone", 5),
        _row(1e-2, "cosine", 6),
    ]
    fallback = {"0.0001-cosine": 0.5, "0.0001-milestone": 0.6, "1e-05-milestone": float("nan")}
    choices = choose_schedulers(rows, fallback)
    assert [c.chosen for c in choices] == [False, True, False, True, True, False, True]
    assert choices[1] == (True, OBJECTIVE, 0.8)
    assert choices[2] == (
        False,
        FALLBACK_OBJECTIVE,
        0.5,
    )  # one trial of 1e-4 lacks its objective: both fall back
    assert choices[4] == (True, "none", None)  # nothing logged: the earliest trial
    assert choices[6].chosen  # a rate with one trial


# --------------------------------------------------------------------------- caption lines


def _params(**columns) -> pd.DataFrame:
    n = max(len(v) for v in columns.values())
    base = {
        "backbone": ["resnet18"] * n,
        "init": ["moco"] * n,
        "protocol": ["linear"] * n,
        "fraction": [1.0] * n,
        "draw": [0] * n,
        "head": ["plain"] * n,
        "min_steps": [""] * n,
        "epochs": [""] * n,
        "epochs_resolved": ["18"] * n,
        "optimizer_steps": [""] * n,
        "epochs_rule": [""] * n,
        "lr": ["3e-05"] * n,
        "batch_size": ["16"] * n,
        "val_every": ["1"] * n,
        "preset": ["cxr"] * n,
        "linear_lr": [""] * n,
        "linear_lrs": [""] * n,
        "linear_lr_chosen": [""] * n,
        "data.frontal_only": [""] * n,
        "data.policy": [""] * n,
        "n_test": [""] * n,
        "probe_gap": [math.nan] * n,
        "best_val_auc": [math.nan] * n,
        "best_at_last": [None] * n,
        "lr_select": [{}] * n,
        "pretrain.frontal_only": [""] * n,
    }
    return pd.DataFrame(base | columns)


def test_the_epoch_line_is_in_numeric_order_of_fraction():
    params = _params(
        fraction=[1.0, 0.1, 0.01, 1.0],
        epochs_resolved=["2", "20", "95", "3"],
        optimizer_steps=["200", "2000", "950", "300"],
        epochs_rule=["size"] * 4,
        min_steps=["0"] * 4,
    )
    line = epochs_line(params, pub.PAPER_EPOCHS)
    assert line == (
        "epochs per label fraction (epochs_rule size: scaled with the size of the labelled set): 1%: 95 "
        "(950 steps), 10%: 20 (2,000 steps), 100%: 2/3 (200-300 steps) (the paper: 0.1%: 220, 1%: 95, "
        "10%: 41, 100%: 18)."
    )
    older = epochs_line(_params(fraction=[0.25, 0.0625], epochs_resolved=["", "52"]), None)
    assert (
        older
        == "epochs per label fraction: 6.25%: 52, 25%: not logged (the paper gives none for this dataset)."
    )
    # a spec that fixes the epochs (the phantom plan's stages) is named as such, not as the rule it overrode
    fixed = epochs_line(
        _params(
            fraction=[0.1, 1.0],
            epochs_resolved=["20", "3"],
            epochs=["3", "None"],
            epochs_rule=["size", "size"],
        ),
        None,
    )
    assert fixed.startswith(
        "epochs per label fraction (set per fraction by the spec's epochs; epochs_rule size: "
        "scaled with the size of the labelled set): 10%: 20, 100%: 3"
    )


def test_the_linear_lr_line_counts_the_per_run_choice():
    params = _params(
        linear_lr=["select"] * 4 + [""],
        linear_lrs=["(3e-05, 0.0001, 0.001)"] * 4 + [""],
        linear_lr_chosen=["3e-05", "0.001", "0.001", ""] + [""],
        lr=["3e-05"] * 4 + ["0.001"],
        lr_select=[{}, {}, {}, {3e-5: 0.7, 1e-4: 0.75, 1e-3: 0.72}, {}],
    )
    assert lr_line(params) == (
        "learning rate chosen per run (backbone x init x fraction x draw) on validation AUC "
        "from {3e-5, 1e-4, 1e-3}, the test set read for the chosen one only: 3e-5 in 1 run, "
        "1e-4 in 1 run, 1e-3 in 2 runs; learning rate 1e-3 in 1 run; batch size 16 (the "
        "paper: 3e-5 and 16, one rate)."
    )
    assert lr_line(_params(lr=["3e-05"])) == "learning rate 3e-5; batch size 16 (as the paper)."
    assert lr_line(_params(lr=[""], batch_size=[""])) == (
        "learning rate not logged; batch size not logged (the paper: 3e-5 and 16, one rate)."
    )


def test_probe_gap_and_best_at_last_lines_and_their_absence():
    params = _params(
        probe_gap=[0.02, 0.31, math.nan],
        fraction=[1.0, 0.01, 0.1],
        init=["moco", "imagenet", "moco"],
        best_at_last=[True, False, None],
    )
    assert probe_gap_line(params).startswith(
        "largest probe gap +0.310 (ResNet18 imagenet 1% draw 0; val/probe_gap"
    )
    assert probe_gap_line(params).endswith("over 2 runs.")
    assert best_at_last_line(params) == (
        "the best validation epoch was the last one in 1 of 2 runs; not logged in 1 "
        "(such a run may still have been improving)."
    )
    older = _params(fraction=[1.0])  # runs before these metrics: no line, no crash
    assert probe_gap_line(older) is None and best_at_last_line(older) is None
    block = protocol_block("e2e", older.assign(protocol="e2e"), None)
    assert [x.split(":")[0] for x in block] == ["End-to-end"] * 4
    assert not any("head" in x or "probe" in x for x in block)
    linear = protocol_block("linear", older, None)
    assert "Linear head: a plain linear layer on the frozen features, as in the paper." in linear


def test_pretraining_data_and_policy_lines():
    pre = _params(**{"pretrain.frontal_only": ["True", ""], "data.frontal_only": ["False", "False"]})
    assert pretraining_data_line(pre, IMAGENET) == (
        "MoCo pretraining images (data.frontal_only of its pretraining runs): frontal views only (the paper "
        "pretrains on CheXpert, whose 224k images include laterals, and does not say it left them out)."
    )
    fine = _params(**{"data.frontal_only": ["False"]})
    assert (
        "(data.frontal_only of the fine-tune runs; the pretraining runs were not found): frontal and lateral "
        "views (the whole training set)." in pretraining_data_line(fine, IMAGENET)
    )
    assert pretraining_data_line(_params(lr=["1"]), IMAGENET) == (
        "MoCo pretraining images: whether frontal only is not logged."
    )
    said = PaperNotes(
        baseline="imagenet", moco_start="imagenet", extra=("MoCo pretraining data: frontal images only",)
    )
    assert pretraining_data_line(pre, said) is None  # the plan's notes say it already
    assert pretraining_data_line(_params(init=["imagenet"]), IMAGENET) is None  # nothing was pretrained
    assert policy_line(_params(**{"data.policy": ["ones"]}), "chexpert").startswith(
        "Uncertainty policy (data.policy): ones (uncertain labels counted as positive)"
    )
    assert "not logged" in policy_line(_params(lr=["1"]), "chexpert")
    assert policy_line(_params(**{"data.policy": ["ones"]}), "shenzhen") is None
