"""The paper's table and figure layouts, from fake fine-tune runs logged straight into MLflow."""

from __future__ import annotations

import csv
import io
import json
import re

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_report import _log_run, _migrated_db, _predictions, store  # noqa: F401  (fixtures and run fakes)

from mococxr.errors import DataError
from mococxr.report import published as pub
from mococxr.report.compare import DIFFERS_MARK as MARK
from mococxr.report.compare import differs, z_difference
from mococxr.report.paper import (
    PaperNotes,
    Table2Row,
    chexpert_family,
    competition_family,
    shenzhen_family,
    table2_report,
)
from mococxr.report.paper_captions import augmentation_line, validation_line
from mococxr.report.paper_tables import lr_text
from mococxr.report.record import report_dir
from mococxr.tracking import mlflow as mt

N = 40
Y = (np.arange(N) % 2).astype(float)
IMAGENET = PaperNotes(
    baseline="imagenet", moco_start="imagenet", extra=("pretraining: 2 epochs per trial, 64 px",)
)
PHANTOM = PaperNotes(baseline="random", moco_start="random")
pytestmark = pytest.mark.usefixtures("store")  # test_report's fresh store per test


def _scores(backbone: str, init: str, protocol: str, fraction: float, rng) -> np.ndarray:
    """ResNet18: MoCo's linear model is perfect (AUC 1, interval [1, 1]); both inits share the same
    end-to-end scores (every e2e difference is exactly 0). Otherwise noisy scores with wide intervals."""
    if backbone == "resnet18" and protocol == "linear" and init == "moco":
        return Y.copy()
    if backbone == "resnet18" and protocol == "e2e":
        return Y * 2 + np.random.default_rng(int(fraction * 1e4)).normal(size=N)
    return Y * (1.5 if init == "moco" else 1.0) + rng.normal(size=N)


def _grid(
    experiment,
    *,
    baseline,
    fractions,
    backbones=("resnet18", "densenet121"),
    task="pleural_effusion",
    column="Pleural Effusion",
    params=None,
    seed=0,
    extra=None,
) -> list[str]:
    """A fake grid; ``extra(backbone, init, protocol, fraction)`` -> (params, metrics, tags) logged on top, as
    the runs of the current finetune log them."""
    rng = np.random.default_rng(seed)
    ids = []
    for backbone in backbones:
        for init in ("moco", baseline):
            for protocol in ("linear", "e2e"):
                for f in fractions:
                    epochs = str(pub.PAPER_EPOCHS.get(f, 30))
                    more, metrics, tags = extra(backbone, init, protocol, f) if extra else ({}, {}, {})
                    logged = {
                        "epochs_resolved": epochs,
                        "lr": "3e-05",
                        "batch_size": "16",
                        **(params or {}),
                        **more,
                    }
                    preds = _predictions(Y, _scores(backbone, init, protocol, f, rng), task=column)
                    rid = _log_run(
                        preds,
                        init=init,
                        protocol=protocol,
                        fraction=f,
                        backbone=backbone,
                        task=task,
                        dataset="chexpert",
                        experiment=experiment,
                        params=logged,
                    )
                    for k, v in metrics.items():
                        MlflowClient().log_metric(rid, k, v)
                    for k, v in tags.items():
                        MlflowClient().set_tag(rid, k, v)
                    ids.append(rid)
    return ids


def _current_runs(backbone, init, protocol, fraction):
    """What a run of the current finetune logs beside the params the reports always read."""
    params = {
        "epochs_rule": "fraction",
        "optimizer_steps": str(10 * pub.PAPER_EPOCHS.get(fraction, 30)),
        "n_test": str(N),
        "data.frontal_only": "True",
        "data.policy": "ignore",
        "preset": "cxr",
    }
    metrics = {"best/epoch": 3.0, "best/val_auc": 0.8}
    tags = {"mococxr.best_at_last_epoch": "true" if (protocol, fraction) == ("e2e", 0.01) else "false"}
    if protocol == "linear":
        chosen = 3e-5 if fraction == 0.01 else 1e-3
        params |= {
            "linear_lr": "select",
            "linear_lrs": "(3e-05, 0.0001, 0.001)",
            "linear_lr_chosen": str(chosen),
            "head": "plain",
        }
        metrics |= {f"lr_select/val_auc/{lr:g}": 0.7 + (lr == chosen) * 0.1 for lr in (3e-5, 1e-4, 1e-3)}
        metrics["val/probe_gap"] = (
            0.25 if (backbone, init, fraction) == ("densenet121", "imagenet", 0.01) else 0.01
        )
    return params, metrics, tags


def _artifacts(run_id: str) -> set[str]:
    """The current revision's files, as paths inside its folder (``report_dir``)."""
    folder = report_dir(run_id)
    return {f.path.removeprefix(folder + "/") for f in MlflowClient().list_artifacts(run_id, folder)}


def _read(run_id: str, path: str, tmp_path) -> str:
    return open(
        MlflowClient().download_artifacts(run_id, f"{report_dir(run_id)}/{path}", str(tmp_path / "dl"))
    ).read()


def _csv(run_id: str, path: str, tmp_path) -> pd.DataFrame:
    local = MlflowClient().download_artifacts(run_id, f"{report_dir(run_id)}/{path}", str(tmp_path / "dl"))
    return pd.read_csv(local, dtype=str, keep_default_na=False)


def _assert_headers(run_id: str, tmp_path) -> None:
    """Every table the family wrote (each CSV, each Markdown table) has unique headers, unique even when cut
    to 15 characters (the MLflow CSV preview showed two columns as "Baseline (Rand…"), and our columns
    before the paper's: each ``paper X`` column after every ``X`` it sits beside."""
    tables = []
    for name in sorted(_artifacts(run_id)):
        if name.endswith(".csv"):
            tables.append((name, next(csv.reader(io.StringIO(_read(run_id, name, tmp_path))))))
        elif name.endswith(".md"):
            lines = _read(run_id, name, tmp_path).splitlines()
            tables += [
                (name, [c.strip() for c in head.strip().strip("|").split(" | ")])
                for head, rule in zip(lines, lines[1:], strict=False)
                if head.startswith("| ") and rule.startswith("|---")
            ]
    assert {n for n, _ in tables} >= {n for n in _artifacts(run_id) if n.endswith(".csv")}
    for name, header in tables:
        assert len(set(header)) == len(header), (name, header)
        assert len({h[:15] for h in header}) == len(header), (name, header)
        lower = [h.lower() for h in header]
        partners = [
            lower.index(h[len("paper ") :]) for h in lower if h.startswith("paper ") and h[6:] in lower
        ]
        papers = [i for i, h in enumerate(lower) if h.startswith("paper ")]
        assert not partners or max(partners) < min(papers), (name, header)


def _fraction_columns(fractions) -> list[str]:
    """Ours at every fraction first, then the paper's (a narrow view of the CSV shows ours)."""
    return [pub_percent(f) for f in fractions] + [f"paper {pub_percent(f)}" for f in fractions]


def pub_percent(f: float) -> str:
    return f"{round(100 * f, 6):g}%"


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[+-]?\d+\.\d+", cell)]


def _z(mine: str, theirs: str) -> float:
    return z_difference(tuple(_numbers(mine)), tuple(_numbers(theirs)[:3]))


def test_chexpert_family_tables_figures_captions_and_rerun(tmp_path):
    ids = _grid(
        "paper-cx",
        baseline="imagenet",
        fractions=(0.01, 1.0),
        params={"min_steps": "200"},
        extra=_current_runs,
    )
    run_id = chexpert_family("paper-cx", notes=IMAGENET, out=tmp_path / "out", n_replicates=50)
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "paper-chexpert" and run.data.tags["mococxr.kind"] == "report"
    items = {
        "table1.md",
        "table1.csv",
        "appendix_table1.md",
        "appendix_table1.csv",
        "figure3.png",
        "figure4.png",
        "appendix_figure3.png",
        "report.html",
        "report.md",
        "runs.json",
    }
    assert _artifacts(run_id) == items
    note = run.data.tags["mlflow.note.content"]
    assert all(f"`{name}`" in note for name in items)
    _assert_headers(run_id, tmp_path)

    table1 = _csv(run_id, "table1.csv", tmp_path)
    assert list(table1.columns) == [
        "Architecture",
        "MoCo-CXR-pretrained",
        "ImageNet-pretrained",
        *_fraction_columns(pub.CHEXPERT_FRACTIONS),
    ]
    assert [tuple(r) for r in table1.iloc[:, :3].to_numpy()] == [
        (a, x, y)
        for a in ("ResNet18", "DenseNet121")
        for x, y in (
            ("End-to-End", "End-to-End"),
            ("Linear Model", "Linear Model"),
            ("Linear Model", "End-to-End"),
        )
    ]
    e2e = table1.iloc[0]
    assert e2e["100%"] == "+0.000 (0.000, 0.000)" and e2e["paper 100%"] == "+0.000 (-0.009, 0.009)"  # inside
    assert e2e["1%"] == "+0.000 (0.000, 0.000)" and e2e["paper 1%"] == f"+0.027 (0.006, 0.047) {MARK}"
    assert e2e["0.1%"] == "" and e2e["paper 0.1%"] == "+0.037 (0.015, 0.062)"  # a fraction we lack: no mark
    assert table1.iloc[1]["100%"].startswith("+") and table1.iloc[1]["paper 100%"].startswith(
        "+0.034 (-0.009, 0.080)"
    )

    app1 = _csv(run_id, "appendix_table1.csv", tmp_path)
    assert list(app1.columns) == [
        "Pretraining",
        "Architecture",
        "Fine tuning",
        *_fraction_columns(pub.CHEXPERT_FRACTIONS),
    ]
    assert len(app1) == 8 and list(app1["Pretraining"][:2]) == ["MoCo", "ImageNet"]
    assert list(app1["Fine tuning"]) == ["Linear Model"] * 4 + ["End-to-End"] * 4
    moco = app1.iloc[0]
    assert moco["100%"] == "1.000 (1.000, 1.000)" and moco["paper 100%"] == f"0.850 (0.808, 0.884) {MARK}"
    marked = 0
    for row in app1.itertuples(index=False):  # the mark says exactly where the two numbers differ
        for f in (0.01, 1.0):
            mine, theirs = (
                row[app1.columns.get_loc(pub_percent(f))],
                row[app1.columns.get_loc(f"paper {pub_percent(f)}")],
            )
            z = _z(mine, theirs)  # from the printed, rounded numbers: a cell near the edge may go either way
            if abs(abs(z) - 1.96) > 0.05:
                assert (
                    theirs.endswith(MARK)
                    == differs(tuple(_numbers(mine)), tuple(_numbers(theirs)[:3]))
                    == (abs(z) > 1.96)
                )
            marked += theirs.endswith(MARK)
    assert any(c.endswith(MARK) for c in app1["paper 1%"]) and not all(
        c.endswith(MARK) for c in app1["paper 100%"]
    )
    app1_md = _read(run_id, "appendix_table1.md", tmp_path)
    assert "16 cells compared, so about 0.8 would be marked by chance alone" in app1_md
    assert f"; {marked} marked." in app1_md

    md = _read(run_id, "table1.md", tmp_path)
    assert md.startswith("# Table 1. AUC improvement of MoCo-CXR-pretrained over ImageNet-pretrained models")
    for words in (
        "from the images of valid.csv",
        f"(every run logged n_test {N}); the paper does not name its test",
        "Linear head: a plain linear layer on the frozen features, as in the paper",
        "Linear: epochs per label fraction (epochs_rule fraction: keyed to the label fraction, the paper's "
        "CheXpert rule): 1%: 95 (950 steps), 100%: 18 (180 steps) (the paper: 0.1%: 220, 1%: 95, "
        "10%: 41, 100%: 18)",
        "at least 200 optimizer steps per run (min_steps",
        "Linear: learning rate chosen per run (backbone x init x fraction x draw) on validation AUC from "
        "{3e-5, 1e-4, 1e-3}, the test set read for the chosen one only: 3e-5 in 4 runs, 1e-3 in 4 runs; "
        "batch size 16 (the paper: 3e-5 and 16, one rate).",
        "End-to-end: learning rate 3e-5; batch size 16 (as the paper).",
        "Linear: augmentation random rotation",
        "End-to-end: augmentation random rotation",
        "Linear: largest probe gap +0.250 (DenseNet121 imagenet 1% draw 0;",
        "Linear: the best validation epoch was the last one in 0 of 8 runs",
        "End-to-end: the best validation epoch was the last one in 4 of 8 runs",
        "Linear: validated every epoch",
        "End-to-end: validated every epoch",
        "MoCo pretraining images (data.frontal_only of the fine-tune runs; the pretraining runs were not "
        "found): frontal views only (the paper pretrains on CheXpert, whose 224k images include laterals",
        "Uncertainty policy (data.policy): ignore (uncertain labels left out",
        "Baseline: ImageNet-pretrained, as in the paper",
        "MoCo pretraining started from ImageNet weights",
        "Pretraining: 2 epochs per trial, 64 px.",
        "50 paired bootstrap replicates",
        f"{MARK} after a published number: it and ours differ at the 5% level",
        "cells compared, so about",
    ):
        assert words in md, words
    assert md.index("- Linear: ") < md.index("- End-to-end: ")  # one block per protocol, linear first
    linear = [x for x in md.splitlines() if x.startswith("- Linear: ")]
    assert md.index(linear[0]) < md.index(linear[-1]) < md.index("- End-to-end: ")
    assert "layout only" not in md and "Phantom" not in md
    report_md = _read(run_id, "report.md", tmp_path)
    assert all(
        h in report_md
        for h in (
            "## Table 1.",
            "## Appendix Table 1.",
            "## Figure 3.",
            "## Figure 4.",
            "## Appendix Figure 3.",
            "![Figure 3](figure3.png)",
        )
    )
    used = json.loads(_read(run_id, "runs.json", tmp_path))
    assert {r["run_id"] for r in used["runs"]} == set(ids) and used["notes"]["baseline"] == "imagenet"

    again = chexpert_family("paper-cx", notes=IMAGENET, out=tmp_path / "out", n_replicates=50)
    assert again == run_id
    assert MlflowClient().get_run(run_id).data.metrics["report/revision"] == 2
    reports = MlflowClient().search_runs([run.info.experiment_id], "tags.`mococxr.kind` = 'report'")
    assert [r.info.run_id for r in reports] == [run_id]


def test_shenzhen_family_on_the_phantom_says_random_init_and_not_comparable(tmp_path):
    params = {"phantom": "True", "head": "plain"}
    _grid(
        "paper-sz",
        baseline="random",
        fractions=(0.0625, 1.0),
        backbones=("resnet18",),
        task="tb",
        column="Tuberculosis",
        params=params,
    )
    run_id = shenzhen_family("paper-sz", notes=PHANTOM, out=tmp_path / "out", n_replicates=30)
    assert MlflowClient().get_run(run_id).info.run_name == "paper-shenzhen"
    assert {"appendix_table2.csv", "appendix_table3.md", "figure5.png", "appendix_figure4.png"} <= _artifacts(
        run_id
    )
    _assert_headers(run_id, tmp_path)
    imp = _csv(run_id, "appendix_table3.csv", tmp_path)
    assert list(imp.columns) == [
        "Architecture",
        "MoCo-CXR-pretrained",
        "Random-init",
        *_fraction_columns(pub.SHENZHEN_FRACTIONS),
    ]
    assert imp.iloc[1]["25%"] == "" and imp.iloc[1]["paper 25%"] == "+0.026 (-0.001, 0.056)"
    absolute = _csv(run_id, "appendix_table2.csv", tmp_path)
    assert list(absolute["Pretraining"]) == ["MoCo", "Random-init"] * 2
    md = _read(run_id, "appendix_table2.md", tmp_path)
    for words in (
        "shown for layout only and are not comparable with these runs: these runs are on synthetic "
        "phantom images, the paper's on radiographs; our MoCo pretraining started from random weights, "
        "the paper's from ImageNet; our baseline is Random-init, the paper's ImageNet-pretrained; no cell "
        "is marked.",
        "Phantom data",
        "Linear head: a plain linear layer on the frozen features, as in the paper",
        "MoCo pretraining started from random weights; the paper started from ImageNet",
        "Baseline: Random-init (init 'random')",
        "the paper gives none for this dataset",
    ):
        assert words in md, words
    # not comparable: no mark in any table, and no line saying what a mark means
    for stem in ("appendix_table2", "appendix_table3"):
        assert MARK not in _read(run_id, f"{stem}.md", tmp_path) + _read(run_id, f"{stem}.csv", tmp_path)
    assert "cells compared" not in _read(run_id, "report.md", tmp_path)


# Table 2's trials: (lr, scheduler) -> the trial's validation objective (None: not given, the fine-tune
# runs' best/val_auc decides) and that best/val_auc. 1e-5's milestone trial lacks its objective, so both
# 1e-5 rows fall back to best/val_auc, where cosine wins although milestone's objective would not matter.
TRIALS = {
    (1e-2, "cosine"): (0.61, 0.9),
    (1e-2, "milestone"): (0.65, 0.5),
    (1e-3, "cosine"): (0.72, 0.5),
    (1e-3, "milestone"): (0.70, 0.9),
    (1e-4, "cosine"): (0.80, 0.6),
    (1e-4, "milestone"): (0.81, 0.6),
    (1e-5, "cosine"): (0.79, 0.85),
    (1e-5, "milestone"): (None, 0.84),
}


def _table2_trials():
    """A pretraining run per trial and its fine-tune run (with best/val_auc); the Table2Rows naming them."""
    rng, rows = np.random.default_rng(1), []
    for i, ((lr, scheduler), (objective, val_auc)) in enumerate(TRIALS.items()):
        with mt.start_run("paper-pretrain", run_name=f"trial-{i}", run_tags=mt.tags(kind="pretrain")) as run:
            mlflow.log_params({"lr": lr, "scheduler": scheduler})
            pre = run.info.run_id
        label = f"moco-lr{lr:g}-{scheduler}"
        rid = _log_run(
            _predictions(Y, Y + rng.normal(size=N), task="Tuberculosis"),
            init=label,
            task="tb",
            dataset="shenzhen",
            experiment="paper-t2",
        )
        MlflowClient().set_tag(rid, "mococxr.pretrain_run_id", pre)
        MlflowClient().log_metric(rid, "best/val_auc", val_auc)
        rows.append(
            Table2Row(
                label=label,
                lr=lr,
                scheduler=scheduler,
                trial=i,
                pretrain_run_id=pre,
                registered_model="mococxr-resnet18",
                version=str(i + 1),
                epoch=5,
                val_objective=objective,
            )
        )
    return rows


def test_table2_is_one_row_per_learning_rate_chosen_on_validation(tmp_path):
    rows = _table2_trials()
    pre = {(r.lr, r.scheduler): r.pretrain_run_id for r in rows}
    run_id = table2_report("paper-t2", rows, notes=IMAGENET, out=tmp_path / "out", n_replicates=30)
    assert MlflowClient().get_run(run_id).info.run_name == "paper-table2"
    assert {"table2.md", "table2.csv", "table2.json", "report.html", "report.md", "runs.json"} == _artifacts(
        run_id
    )
    chosen = [
        (1e-2, "milestone"),
        (1e-3, "cosine"),
        (1e-4, "milestone"),
        (1e-5, "cosine"),
    ]  # the paper's order

    _assert_headers(run_id, tmp_path)
    table = _csv(run_id, "table2.csv", tmp_path)  # every trial, the chosen one first within its rate
    assert list(table.columns) == [
        "Learning rate",
        "Scheduler",
        "AUC (lo, hi)",
        "paper AUC (lo, hi)",
        "validation",
        "chosen",
        "pretraining run",
        "trial",
        "checkpoint",
        "link",
    ]
    assert list(table["Learning rate"]) == ["1e-2", "1e-2", "1e-3", "1e-3", "1e-4", "1e-4", "1e-5", "1e-5"]
    assert list(table["chosen"]) == ["True", "False"] * 4
    assert list(zip(table["Learning rate"][::2], table["Scheduler"][::2], strict=True)) == [
        (lr_text(lr), s) for lr, s in chosen
    ]
    assert list(table["validation"][:2]) == ["0.650 (val/linear_auc)", "0.610 (val/linear_auc)"]
    assert list(table["validation"][6:]) == ["0.850 (best/val_auc)", "0.840 (best/val_auc)"]
    assert all(table["paper AUC (lo, hi)"][1::2] == "")  # the published number only beside the chosen row
    assert table["paper AUC (lo, hi)"][4].startswith("0.944 (0.907, 0.972)") and table["paper AUC (lo, hi)"][
        0
    ].startswith("0.786 (0.699, 0.861)")
    exp_id = MlflowClient().get_experiment_by_name("paper-pretrain").experiment_id
    assert table["link"][0] == f"#/experiments/{exp_id}/runs/{pre[chosen[0]]}"
    assert table["checkpoint"][0] == "mococxr-resnet18 v2, epoch 5"

    md = _read(run_id, "table2.md", tmp_path)
    body = md[md.index("| Learning rate") :]
    assert len([x for x in body.splitlines() if x.startswith("| 1e-")]) == 4  # the paper's shape: 4 rows
    assert [
        re.match(r"\| (1e-\d) +\| (\w+)", x).groups() for x in body.splitlines() if x.startswith("| 1e-")
    ] == [(lr_text(lr), s) for lr, s in chosen]
    assert f"[{pre[(1e-4, 'milestone')]}](#/experiments/{exp_id}/runs/{pre[(1e-4, 'milestone')]})" in md
    assert "chosen" not in body.splitlines()[0]
    for words in (
        "One row per pretraining learning rate, as the paper's Table 2",
        "1e-2: milestone (val/linear_auc 0.650 against cosine 0.610)",
        "1e-5: cosine (best/val_auc 0.850 against milestone 0.840)",
        "never the test AUC",
        "kept in table2.csv and table2.json (chosen false)",
        "4 cells compared, so about 0.2 would be marked",
    ):
        assert words in md, words
    assert "Baseline:" not in md and "layout only" not in md  # no baseline here; comparable runs
    records = json.loads(_read(run_id, "table2.json", tmp_path))["rows"]
    assert len(records) == 8 and [r["chosen"] for r in records] == [True, False] * 4
    assert records[4]["paper"]["point"] == 0.944 and records[5]["paper"] is None
    assert records[0]["val_objective"] == 0.65 and records[0]["criterion"] == "val/linear_auc"
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert "table2/auc_lr0.0001" in metrics and "table2/auc_lr0.0001_cosine" in metrics
    assert lr_text(3e-5) == "3e-5" and lr_text(0.01) == "1e-2"

    wrong = [Table2Row(**{**rows[0].__dict__, "pretrain_run_id": rows[1].pretrain_run_id})]
    with pytest.raises(DataError, match=r"paper-table2: .*came from pretraining run\(s\)"):
        table2_report("paper-t2", wrong, notes=IMAGENET, out=tmp_path / "out", n_replicates=30)
    with pytest.raises(DataError, match="no finished fine-tune runs of init"):
        table2_report(
            "paper-t2",
            [Table2Row(**{**rows[0].__dict__, "label": "moco-nowhere"})],
            notes=IMAGENET,
            out=tmp_path / "out",
            n_replicates=30,
        )
    phantom = table2_report("paper-t2", rows, notes=PHANTOM, out=tmp_path / "again", n_replicates=30)
    md = _read(phantom, "table2.md", tmp_path / "p")  # random-start MoCo: not comparable, no mark
    assert MARK not in md and "no cell is marked" in md and "cells compared" not in md


def test_competition_family_groups_rows_by_task(tmp_path):
    for task in ("Atelectasis", "Edema"):
        _grid(
            "paper-comp",
            baseline="imagenet",
            fractions=(0.001, 1.0),
            backbones=("resnet18",),
            task=task,
            column=task,
        )
    run_id = competition_family(
        "paper-comp", ["Atelectasis", "Edema"], notes=IMAGENET, out=tmp_path / "out", n_replicates=30
    )
    assert MlflowClient().get_run(run_id).info.run_name == "paper-competition"
    assert {
        "appendix_table4.md",
        "appendix_table4.csv",
        "appendix_table5.md",
        "appendix_table5.csv",
        "report.html",
        "report.md",
        "runs.json",
    } == _artifacts(run_id)
    _assert_headers(run_id, tmp_path)
    # the counters cover both tasks' runs (2 tasks x 2 inits x 2 protocols x 2 fractions), not the last task's
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert (metrics["report/n_runs"], metrics["report/n_cells"], metrics["report/n_tasks"]) == (16, 16, 2)
    assert metrics["Atelectasis/report/n_runs"] == metrics["Edema/report/n_runs"] == 8
    t4 = _csv(run_id, "appendix_table4.csv", tmp_path)
    assert list(t4.columns) == [  # ours first, then the paper's
        "Task",
        "Label fraction",
        "Baseline (ImageNet)",
        "MoCo-CXR",
        "Improvement",
        "paper baseline (ImageNet)",
        "paper MoCo-CXR",
        "paper improvement",
    ]
    assert list(t4["Task"]) == ["Atelectasis"] * 4 + ["Edema"] * 4
    assert list(t4["Label fraction"][:4]) == ["0.1%", "1%", "10%", "100%"]
    first = t4.iloc[0]
    assert first["paper baseline (ImageNet)"].startswith("0.602 (0.571, 0.635)") and first["MoCo-CXR"] != ""
    assert t4.iloc[1]["MoCo-CXR"] == "" and t4.iloc[1]["paper MoCo-CXR"] == "0.671 (0.623, 0.714)"
    t5 = _csv(run_id, "appendix_table5.csv", tmp_path)
    assert t5.iloc[7]["paper improvement"].startswith("-0.013 (-0.027, 0.001)")
    md = _read(run_id, "appendix_table4.md", tmp_path)
    assert "Atelectasis: Task Atelectasis on dataset chexpert" in md and "Edema: Task Edema" in md
    assert (
        "Linear head: standardized, unlike the paper" in md and md.count("Linear head") == 1
    )  # a shared line is said once
    # comparable (ImageNet baseline, real data): 2 tasks x 2 fractions x 3 columns compared
    assert "12 cells compared, so about 0.6 would be marked by chance alone" in md
    md5 = _read(run_id, "appendix_table5.md", tmp_path)
    assert (
        "Corrected published cells" not in md5
    )  # its corrected cells are Pleural Effusion's, not shown here


def test_missing_runs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"^paper-chexpert: experiment 'nowhere' not found"):
        chexpert_family("nowhere", notes=IMAGENET, out=tmp_path / "a", n_replicates=20)
    _log_run(_predictions(Y, Y), init="moco", experiment="paper-half")
    with pytest.raises(
        DataError, match=r"experiment 'paper-half' has no finished fine-tune runs of init \['imagenet'\]"
    ):
        chexpert_family("paper-half", notes=IMAGENET, out=tmp_path / "b", n_replicates=20)
    with pytest.raises(
        DataError, match=r"paper-competition: no FINISHED runs in experiment 'paper-half' .*Edema"
    ):
        competition_family("paper-half", ["Edema"], notes=IMAGENET, out=tmp_path / "c", n_replicates=20)


def test_the_validation_cadence_is_a_caption_line():
    """The paper states no cadence: a caption says when a protocol's runs validated."""
    assert validation_line(pd.DataFrame({"val_every": ["5", "5"]})) == (
        "validated every 5 epochs and after the last; the epoch of best validation AUC scores the test set "
        "(the paper states no validation cadence)."
    )
    older = pd.DataFrame({"val_every": ["1"]})  # runs before val_every: every epoch
    assert validation_line(older).startswith("validated every epoch;")


def test_fine_tune_augmentation_is_a_caption_line():
    assert augmentation_line(pd.DataFrame({"preset": ["none"]})) == (
        "augmentation none (the eval resize only; linear heads train on cached frozen features) (preset "
        "none; the paper does not say whether it augmented)."
    )
    assert augmentation_line(pd.DataFrame({"preset": ["cxr"]})).startswith(
        "augmentation random rotation within 10 degrees and horizontal flip (preset cxr;"
    )
