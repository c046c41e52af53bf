"""The paper's table and figure layouts, from fake fine-tune runs logged straight into MLflow."""

from __future__ import annotations

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
from mococxr.report.paper import (
    PaperNotes,
    Table2Row,
    chexpert_family,
    competition_family,
    shenzhen_family,
    table2_report,
)
from mococxr.report.paper_tables import MARK, augmentation_line, lr_text, outside, validation_line
from mococxr.report.record import report_dir
from mococxr.tracking import mlflow as mt

N = 40
Y = (np.arange(N) % 2).astype(float)
IMAGENET = PaperNotes(baseline="imagenet", moco_start="imagenet", extra=("pretraining: 2 epochs per trial, 64 px",))
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


def _grid(experiment, *, baseline, fractions, backbones=("resnet18", "densenet121"), task="pleural_effusion",
          column="Pleural Effusion", params=None, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = []
    for backbone in backbones:
        for init in ("moco", baseline):
            for protocol in ("linear", "e2e"):
                for f in fractions:
                    epochs = str(pub.PAPER_EPOCHS.get(f, 30))
                    logged = {"epochs_resolved": epochs, "lr": "3e-05", "batch_size": "16", **(params or {})}
                    preds = _predictions(Y, _scores(backbone, init, protocol, f, rng), task=column)
                    ids.append(_log_run(preds, init=init, protocol=protocol, fraction=f, backbone=backbone, task=task,
                                        dataset="chexpert", experiment=experiment, params=logged))
    return ids


def _artifacts(run_id: str) -> set[str]:
    """The current revision's files, as paths inside its folder (``report_dir``)."""
    folder = report_dir(run_id)
    return {f.path.removeprefix(folder + "/") for f in MlflowClient().list_artifacts(run_id, folder)}


def _read(run_id: str, path: str, tmp_path) -> str:
    return open(MlflowClient().download_artifacts(run_id, f"{report_dir(run_id)}/{path}", str(tmp_path / "dl"))).read()


def _csv(run_id: str, path: str, tmp_path) -> pd.DataFrame:
    local = MlflowClient().download_artifacts(run_id, f"{report_dir(run_id)}/{path}", str(tmp_path / "dl"))
    return pd.read_csv(local, dtype=str, keep_default_na=False)


def _fraction_columns(fractions) -> list[str]:
    return [c for f in fractions for c in (pub_percent(f), f"{pub_percent(f)} paper")]


def pub_percent(f: float) -> str:
    return f"{round(100 * f, 6):g}%"


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[+-]?\d+\.\d+", cell)]


def test_chexpert_family_tables_figures_captions_and_rerun(tmp_path):
    ids = _grid("paper-cx", baseline="imagenet", fractions=(0.01, 1.0), params={"min_steps": "200"})
    run_id = chexpert_family("paper-cx", notes=IMAGENET, out=tmp_path / "out", n_replicates=50)
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "paper-chexpert" and run.data.tags["mococxr.kind"] == "report"
    items = {"table1.md", "table1.csv", "appendix_table1.md", "appendix_table1.csv", "figure3.png", "figure4.png",
             "appendix_figure3.png", "report.md", "runs.json"}
    assert _artifacts(run_id) == items
    note = run.data.tags["mlflow.note.content"]
    assert all(f"`{name}`" in note for name in items)

    table1 = _csv(run_id, "table1.csv", tmp_path)
    assert list(table1.columns) == ["Architecture", "MoCo-CXR-pretrained", "ImageNet-pretrained",
                                    *_fraction_columns(pub.CHEXPERT_FRACTIONS)]
    assert [tuple(r) for r in table1.iloc[:, :3].to_numpy()] == [
        (a, x, y) for a in ("ResNet18", "DenseNet121") for x, y in
        (("End-to-End", "End-to-End"), ("Linear Model", "Linear Model"), ("Linear Model", "End-to-End"))]
    e2e = table1.iloc[0]
    assert e2e["100%"] == "+0.000 (0.000, 0.000)" and e2e["100% paper"] == "+0.000 (-0.009, 0.009)"  # inside
    assert e2e["1%"] == "+0.000 (0.000, 0.000)" and e2e["1% paper"] == f"+0.027 (0.006, 0.047) {MARK}"
    assert e2e["0.1%"] == "" and e2e["0.1% paper"] == "+0.037 (0.015, 0.062)"  # a fraction we lack: no mark
    assert table1.iloc[1]["100%"].startswith("+") and table1.iloc[1]["100% paper"].startswith("+0.034 (-0.009, 0.080)")

    app1 = _csv(run_id, "appendix_table1.csv", tmp_path)
    assert list(app1.columns) == ["Pretraining", "Architecture", "Fine tuning", *_fraction_columns(pub.CHEXPERT_FRACTIONS)]
    assert len(app1) == 8 and list(app1["Pretraining"][:2]) == ["MoCo", "ImageNet"]
    assert list(app1["Fine tuning"]) == ["Linear Model"] * 4 + ["End-to-End"] * 4
    moco = app1.iloc[0]
    assert moco["100%"] == "1.000 (1.000, 1.000)" and moco["100% paper"] == f"0.850 (0.808, 0.884) {MARK}"
    for row in app1.itertuples(index=False):  # the mark says exactly where the published point is outside
        for f in (0.01, 1.0):
            mine, theirs = row[app1.columns.get_loc(pub_percent(f))], row[app1.columns.get_loc(f"{pub_percent(f)} paper")]
            point, lo, hi = _numbers(mine)
            if abs(_numbers(theirs)[0] - lo) > 2e-3 and abs(_numbers(theirs)[0] - hi) > 2e-3:
                assert theirs.endswith(MARK) == outside(pub.Published(*_numbers(theirs)[:3]), lo, hi)
    assert any(c.endswith(MARK) for c in app1["1% paper"]) and not all(c.endswith(MARK) for c in app1["100% paper"])

    md = _read(run_id, "table1.md", tmp_path)
    assert md.startswith("# Table 1. AUC improvement of MoCo-CXR-pretrained over ImageNet-pretrained models")
    for words in ("from the images of valid.csv", "Linear head: standardized, unlike the paper",
                  "1%: 95, 100%: 18 (the paper: 0.1%: 220, 1%: 95, 10%: 41, 100%: 18)",
                  "at least 200 optimizer steps per run (min_steps", "Baseline: ImageNet-pretrained, as in the paper",
                  "MoCo pretraining started from ImageNet weights", "Pretraining: 2 epochs per trial, 64 px.",
                  "50 paired bootstrap replicates", f"{MARK} the published point lies outside our 95% interval"):
        assert words in md, words
    assert "layout only" not in md and "Phantom" not in md
    report_md = _read(run_id, "report.md", tmp_path)
    assert all(h in report_md for h in ("## Table 1.", "## Appendix Table 1.", "## Figure 3.", "## Figure 4.",
                                        "## Appendix Figure 3.", "![Figure 3](figure3.png)"))
    used = json.loads(_read(run_id, "runs.json", tmp_path))
    assert {r["run_id"] for r in used["runs"]} == set(ids) and used["notes"]["baseline"] == "imagenet"

    again = chexpert_family("paper-cx", notes=IMAGENET, out=tmp_path / "out", n_replicates=50)
    assert again == run_id
    assert MlflowClient().get_run(run_id).data.metrics["report/revision"] == 2
    reports = MlflowClient().search_runs([run.info.experiment_id], "tags.`mococxr.kind` = 'report'")
    assert [r.info.run_id for r in reports] == [run_id]


def test_shenzhen_family_on_the_phantom_says_random_init_and_not_comparable(tmp_path):
    params = {"phantom": "True", "head": "plain"}
    _grid("paper-sz", baseline="random", fractions=(0.0625, 1.0), backbones=("resnet18",), task="tb",
          column="Tuberculosis", params=params)
    run_id = shenzhen_family("paper-sz", notes=PHANTOM, out=tmp_path / "out", n_replicates=30)
    assert MlflowClient().get_run(run_id).info.run_name == "paper-shenzhen"
    assert {"appendix_table2.csv", "appendix_table3.md", "figure5.png", "appendix_figure4.png"} <= _artifacts(run_id)
    imp = _csv(run_id, "appendix_table3.csv", tmp_path)
    assert list(imp.columns) == ["Architecture", "MoCo-CXR-pretrained", "Random-init",
                                 *_fraction_columns(pub.SHENZHEN_FRACTIONS)]
    assert imp.iloc[1]["25%"] == "" and imp.iloc[1]["25% paper"] == "+0.026 (-0.001, 0.056)"
    absolute = _csv(run_id, "appendix_table2.csv", tmp_path)
    assert list(absolute["Pretraining"]) == ["MoCo", "Random-init"] * 2
    md = _read(run_id, "appendix_table2.md", tmp_path)
    for words in ("shown for layout only and are not comparable with these runs: these runs are on synthetic "
                  "phantom images, the paper's on radiographs; our baseline is Random-init", "Phantom data",
                  "Linear head: a plain linear layer on the frozen features, as in the paper",
                  "MoCo pretraining started from random weights; the paper started from ImageNet",
                  "Baseline: Random-init (init 'random')", "the paper gives none for this dataset"):
        assert words in md, words


def test_table2_rows_link_their_pretraining_runs(tmp_path):
    pre = {}
    for lr in (1e-3, 1e-4):
        with mt.start_run("paper-pretrain", run_name=f"trial-{lr:g}", run_tags=mt.tags(kind="pretrain")) as run:
            mlflow.log_param("lr", lr)
            pre[lr] = run.info.run_id
    rng = np.random.default_rng(1)
    for lr in pre:
        rid = _log_run(_predictions(Y, Y + rng.normal(size=N), task="Tuberculosis"), init=f"moco-lr{lr:g}",
                       task="tb", dataset="shenzhen", experiment="paper-t2")
        MlflowClient().set_tag(rid, "mococxr.pretrain_run_id", pre[lr])
    rows = [Table2Row(label=f"moco-lr{lr:g}", lr=lr, scheduler="cosine", trial=i, pretrain_run_id=pre[lr],
                      registered_model="mococxr-resnet18", version=str(i + 1), epoch=5) for i, lr in enumerate(pre)]
    run_id = table2_report("paper-t2", rows, notes=PHANTOM, out=tmp_path / "out", n_replicates=30)
    assert MlflowClient().get_run(run_id).info.run_name == "paper-table2"
    assert {"table2.md", "table2.csv", "table2.json", "report.md", "runs.json"} == _artifacts(run_id)
    table = _csv(run_id, "table2.csv", tmp_path)
    assert list(table.columns) == ["Learning rate", "Scheduler", "AUC (lo, hi)", "paper", "pretraining run", "trial",
                                   "checkpoint", "link"]
    exp_id = MlflowClient().get_experiment_by_name("paper-pretrain").experiment_id
    assert list(table["pretraining run"]) == [pre[1e-3], pre[1e-4]]
    assert list(table["link"]) == [f"#/experiments/{exp_id}/runs/{pre[lr]}" for lr in (1e-3, 1e-4)]
    assert list(table["Learning rate"]) == ["1e-3", "1e-4"] and table["paper"][1].startswith("0.944 (0.907, 0.972)")
    assert table["checkpoint"][0] == "mococxr-resnet18 v1, epoch 5"
    md = _read(run_id, "table2.md", tmp_path)
    assert f"[{pre[1e-4]}](#/experiments/{exp_id}/runs/{pre[1e-4]})" in md
    assert "Baseline:" not in md and "layout only" not in md  # no baseline here, and these runs are not phantom
    records = json.loads(_read(run_id, "table2.json", tmp_path))["rows"]
    assert [r["pretrain_run_id"] for r in records] == [pre[1e-3], pre[1e-4]] and records[1]["paper"]["point"] == 0.944
    assert lr_text(3e-5) == "3e-5" and lr_text(0.01) == "1e-2"

    wrong = [Table2Row(**{**rows[0].__dict__, "pretrain_run_id": pre[1e-4]})]
    with pytest.raises(DataError, match=r"paper-table2: .*came from pretraining run\(s\)"):
        table2_report("paper-t2", wrong, notes=PHANTOM, out=tmp_path / "out", n_replicates=30)
    with pytest.raises(DataError, match="no finished fine-tune runs of init"):
        table2_report("paper-t2", [Table2Row(**{**rows[0].__dict__, "label": "moco-lr0.01"})], notes=PHANTOM,
                      out=tmp_path / "out", n_replicates=30)


def test_competition_family_groups_rows_by_task(tmp_path):
    for task in ("Atelectasis", "Edema"):
        _grid("paper-comp", baseline="imagenet", fractions=(0.001, 1.0), backbones=("resnet18",), task=task,
              column=task)
    run_id = competition_family("paper-comp", ["Atelectasis", "Edema"], notes=IMAGENET, out=tmp_path / "out",
                                n_replicates=30)
    assert MlflowClient().get_run(run_id).info.run_name == "paper-competition"
    assert {"appendix_table4.md", "appendix_table4.csv", "appendix_table5.md", "appendix_table5.csv",
            "report.md", "runs.json"} == _artifacts(run_id)
    t4 = _csv(run_id, "appendix_table4.csv", tmp_path)
    assert list(t4.columns) == ["Task", "Baseline (ImageNet)", "Baseline (ImageNet) paper", "MoCo-CXR", "MoCo-CXR paper",
                                "Improvement", "Improvement paper", "Label fraction"]
    assert list(t4["Task"]) == ["Atelectasis"] * 4 + ["Edema"] * 4
    assert list(t4["Label fraction"][:4]) == ["0.1%", "1%", "10%", "100%"]
    first = t4.iloc[0]
    assert first["Baseline (ImageNet) paper"].startswith("0.602 (0.571, 0.635)") and first["MoCo-CXR"] != ""
    assert t4.iloc[1]["MoCo-CXR"] == "" and t4.iloc[1]["MoCo-CXR paper"] == "0.671 (0.623, 0.714)"
    t5 = _csv(run_id, "appendix_table5.csv", tmp_path)
    assert t5.iloc[7]["Improvement paper"].startswith("-0.013 (-0.027, 0.001)")
    md = _read(run_id, "appendix_table4.md", tmp_path)
    assert "Atelectasis: Task Atelectasis on dataset chexpert" in md and "Edema: Task Edema" in md
    assert "Linear head: standardized" in md and md.count("Linear head") == 1  # a shared line is said once


def test_missing_runs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"^paper-chexpert: experiment 'nowhere' not found"):
        chexpert_family("nowhere", notes=IMAGENET, out=tmp_path / "a", n_replicates=20)
    _log_run(_predictions(Y, Y), init="moco", experiment="paper-half")
    with pytest.raises(DataError, match=r"experiment 'paper-half' has no finished fine-tune runs of init \['imagenet'\]"):
        chexpert_family("paper-half", notes=IMAGENET, out=tmp_path / "b", n_replicates=20)
    with pytest.raises(DataError, match=r"paper-competition: no FINISHED runs in experiment 'paper-half' .*Edema"):
        competition_family("paper-half", ["Edema"], notes=IMAGENET, out=tmp_path / "c", n_replicates=20)


def test_the_validation_cadence_is_a_caption_line():
    """The paper states no cadence: a caption says when each protocol's runs validated."""
    params = pd.DataFrame({"protocol": ["linear", "linear", "e2e", "e2e"], "val_every": ["1", "1", "5", "5"]})
    assert validation_line(params) == ("Each run reports its epoch of best validation AUC, validated e2e every 5 "
                                       "epochs and after the last, linear every epoch (the paper states no "
                                       "validation cadence).")
    older = pd.DataFrame({"protocol": ["linear"], "val_every": ["1"]})  # runs before val_every: every epoch
    assert "linear every epoch" in validation_line(older)


def test_fine_tune_augmentation_is_a_caption_line():
    params = pd.DataFrame({"protocol": ["linear", "e2e"], "preset": ["none", "cxr"]})
    assert augmentation_line(params) == (
        "Fine-tune augmentation: e2e random rotation within 10 degrees and horizontal flip; linear none (the eval "
        "resize only; linear heads train on cached frozen features) (the paper does not say whether it augmented "
        "while fine-tuning).")
