"""Report tables from fake fine-tune runs logged straight into MLflow (no training needed)."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score, roc_auc_score

from mococxr.data.phantom import MARKER
from mococxr.errors import ConfigError, DataError, TrackingError
from mococxr.report.bootstrap import bootstrap_counts
from mococxr.report.record import report_dir
from mococxr.report.tables import (
    build_report,
    format_report,
    fraction_label,
    to_latex,
    to_markdown,
    wide_table,
)
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt

EXP = "report-test"
# Eight test images, four negatives then four positives, and score vectors whose AUC is known by
# counting the (negative, positive) pairs ordered wrongly out of 16.
Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=float)
S8 = {
    1.0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],  # no pair wrong
    0.9375: [0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9],  # 0.6 above 0.5: 1 wrong
    0.875: [0.1, 0.2, 0.55, 0.6, 0.5, 0.7, 0.8, 0.9],  # 2 wrong
    0.625: [0.1, 0.6, 0.7, 0.8, 0.5, 0.65, 0.75, 0.9],  # 3 + 2 + 1 wrong
}
# (init, fraction) -> the AUCs of draws 0 and 1
TOY = {
    ("random", 0.1): (0.625, 0.875),
    ("random", 1.0): (0.875, 0.9375),
    ("moco", 0.1): (0.9375, 1.0),
    ("moco", 1.0): (1.0, 1.0),
}


def _predictions(y, scores, *, image_ids=None, patients=None, task="Effusion") -> pd.DataFrame:
    y = np.asarray(y, dtype=float)
    ids = image_ids if image_ids is not None else [f"img{i:04d}.png" for i in range(y.size)]
    pats = patients if patients is not None else [f"p{i // 2}" for i in range(y.size)]
    return pd.DataFrame(
        {
            "image_id": ids,
            "patient_id": pats,
            f"label:{task}": y,
            f"score:{task}": np.asarray(scores, dtype=float),
        }
    )


def _log_run(
    preds: pd.DataFrame,
    *,
    init,
    protocol="linear",
    fraction=1.0,
    draw=0,
    backbone="resnet18",
    sha="sha-test",
    task="pleural_effusion",
    dataset="nih",
    experiment=EXP,
    params=None,
) -> str:
    """A fake fine-tune run: tags and params as finetune logs them, and the predictions artifact."""
    moco = init.startswith("moco")
    run_tags = mt.tags(
        kind="finetune",
        backbone=backbone,
        init=init,
        protocol=protocol,
        dataset=dataset,
        task=task,
        label_fraction=str(float(fraction)),
        draw=str(draw),
        test_manifest_sha256=sha,
        config_hash="cfg",
        pretrain_run_id="pre" if moco else None,
        registry_version="3" if moco else None,
        checkpoint_epoch="5" if moco else None,
    )
    default = {"phantom": "False", "data.test_csv": "valid.csv", "data.root": "/data/nih"}
    with mt.start_run(
        experiment, run_name=f"{init}-{protocol}-{fraction:g}-d{draw}", run_tags=run_tags
    ) as run:
        logged = {**default, **({"init_registered_model": "mococxr-x"} if moco else {}), **(params or {})}
        mlflow.log_params({k: v for k, v in logged.items() if v is not None})  # None: a param left out
        ma.log_parquet(preds, "predictions/test.parquet")
        return run.info.run_id


@pytest.fixture(scope="module")
def _migrated_db(tmp_path_factory):
    """One empty, migrated sqlite store per module: MLflow's schema migration costs seconds per store."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tracking_uri, _migrated_db) -> str:
    """The conftest ``tracking_uri`` store, started from a copy of the migrated empty database."""
    shutil.copy(_migrated_db, tracking_uri.removeprefix("sqlite:///"))
    mt.open_store()
    return tracking_uri


def _toy_runs(label=None, experiment=EXP) -> dict[tuple, str]:
    """The TOY runs; ``label`` renames inits (e.g. ``{"moco": "moco-v2"}``) as a grid may call them."""
    label = label or {}
    return {
        (init, f, d): _log_run(
            _predictions(Y8, S8[auc]), init=label.get(init, init), fraction=f, draw=d, experiment=experiment
        )
        for (init, f), aucs in TOY.items()
        for d, auc in enumerate(aucs)
    }


def _synthetic(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(float)
    return y, rng


def test_toy_table_by_hand(store, tmp_path):
    ids = _toy_runs()
    report = build_report(EXP, out=tmp_path / "out", n_replicates=200, seed=3, log_to_mlflow=False)
    auc = report.absolute[report.absolute.metric == "auc"].set_index(["init", "fraction"])
    for (init, f), aucs in TOY.items():
        by_sklearn = np.mean([roc_auc_score(Y8, S8[a]) for a in aucs])
        assert auc.loc[(init, f), "point"] == pytest.approx(np.mean(aucs), abs=1e-12)
        assert auc.loc[(init, f), "point"] == pytest.approx(by_sklearn, abs=1e-12)
        assert auc.loc[(init, f), "n_draws"] == 2
        assert set(auc.loc[(init, f), "run_ids"].split()) == {ids[(init, f, 0)], ids[(init, f, 1)]}

    # The interval, independently: materialise each resample, sklearn per draw, mean across draws.
    counts = bootstrap_counts(8, 200, seed=3)
    per_rep = []
    for c in counts:
        idx = np.repeat(np.arange(8), c)
        if np.unique(Y8[idx]).size < 2:
            continue
        per_rep.append(
            np.mean([roc_auc_score(Y8[idx], np.asarray(S8[a])[idx]) for a in TOY[("random", 0.1)]])
        )
    lo, hi = np.percentile(per_rep, [2.5, 97.5])
    assert auc.loc[("random", 0.1), "lo"] == pytest.approx(lo, abs=1e-12)
    assert auc.loc[("random", 0.1), "hi"] == pytest.approx(hi, abs=1e-12)

    imp = report.improvement[report.improvement.metric == "auc"].set_index("fraction")
    assert list(report.improvement["comparison"].unique()) == ["moco linear - random linear"]
    assert imp.loc[0.1, "point"] == pytest.approx(0.96875 - 0.75)
    assert imp.loc[1.0, "point"] == pytest.approx(1.0 - 0.90625)

    table = wide_table(report.absolute, "auc")
    assert list(table.columns) == ["Architecture", "Init", "Protocol", "10%", "100%"]
    assert list(table["Init"]) == ["random", "moco"]
    assert table.loc[0, "10%"].startswith("0.750 (")
    md = to_markdown(table)
    assert md.splitlines()[:2] == [
        "| Architecture | Init | Protocol | 10% | 100% |",
        "|---|---|---|---:|---:|",
    ]
    assert "| resnet18 | moco | linear | 0.969 (" in md
    tex = to_latex(table)
    assert r"10\% & 100\% \\" in tex and tex.strip().endswith(r"\end{tabular}")
    assert [fraction_label(f) for f in (0.001, 0.01, 0.07, 1.0)] == ["0.1%", "1%", "7%", "100%"]

    # the terminal text says what the table is: task, dataset, label fractions, draws, test set, checkpoint
    text = format_report(report)
    where = ", task pleural_effusion, dataset nih"
    labelled = to_markdown(wide_table(report.absolute, "auc", header="label fraction "))
    improvement_md = to_markdown(wide_table(report.improvement, "auc", header="label fraction "))
    tables = (
        f"\nAUC (95% CI){where}\n\n{labelled}\n\nAUC difference, paired (95% CI){where}\n\n{improvement_md}"
    )
    assert text == "\n".join(report.context.lines()) + "\n" + tables
    assert text.splitlines()[:6] == [
        "Task pleural_effusion on dataset nih (MLflow experiment report-test).",
        "Columns are label fractions: the share of the training split's labelled images each fine-tune used.",
        "Each cell is the mean over 2 draws (random label-fraction samples).",
        "Test set: 8 images of 4 patients, from the images of valid.csv; the same images score every cell.",
        "8 fine-tune runs in 4 cells.",
        "Init moco = registered model mococxr-x version 3 (pretraining run pre, epoch 5).",
    ]
    assert "| Architecture | Init | Protocol | label fraction 10% | label fraction 100% |" in text
    assert "| resnet18 | moco linear - random linear | +0.219 (" in text
    md_file = (tmp_path / "out" / "report.md").read_text()
    assert md_file.startswith(
        "# mococxr report: task pleural_effusion, dataset nih\n\n- Task pleural_effusion"
    )
    assert "label fraction 10%" in md_file and "AUC difference, moco - baseline" in md_file
    # the plot carries a short title; what its numbers rest on is text beside it (report.html, report.md)
    assert report.context.plot_title() == "pleural_effusion on nih"
    assert "8 images of 4 patients" in report.context.plot_caption() and "8 images" in md_file
    assert "![Test AUC against label fraction" in md_file and "(plots/auc.png)" in md_file
    csv = pd.read_csv(tmp_path / "out" / "tables" / "absolute.csv")  # the tidy CSV keeps its columns
    assert list(csv.columns) == [
        "task",
        "backbone",
        "init",
        "protocol",
        "fraction",
        "metric",
        "point",
        "lo",
        "hi",
        "n_draws",
        "n_replicates",
        "n_single_class",
        "run_ids",
    ]


def test_report_run_is_logged_with_tables_plots_and_run_ids(store, tmp_path):
    ids = _toy_runs()
    report = build_report(EXP, out=tmp_path / "out", n_replicates=50, seed=1)
    client = MlflowClient()
    run = client.get_run(report.run_id)
    assert run.data.tags["mococxr.kind"] == "report"
    assert run.data.tags["mococxr.task"] == "pleural_effusion" and run.data.tags["mococxr.dataset"] == "nih"
    assert run.info.status == "FINISHED"
    assert run.data.params["replicates"] == "50" and run.data.params["seed"] == "1"
    exp = client.get_experiment_by_name(EXP)
    assert run.info.experiment_id == exp.experiment_id

    folder = report_dir(report.run_id)  # the current revision's folder

    def walk(path):
        for f in client.list_artifacts(report.run_id, path):
            yield from walk(f.path) if f.is_dir else [f.path.removeprefix(folder + "/")]

    files = set(walk(folder))
    assert {
        "report.html",
        "report.md",
        "runs.json",
        "tables/absolute.csv",
        "tables/improvement.csv",
        "tables/absolute_auc.tex",
        "tables/improvement_auc.tex",
        "plots/auc.png",
        "plots/auprc.png",
    } <= files
    assert not any(".cache" in f for f in files)
    local = client.download_artifacts(report.run_id, f"{folder}/runs.json", str(tmp_path / "dl"))
    used = json.loads(open(local).read())["runs"]
    assert {r["run_id"] for r in used} == set(ids.values())
    assert {(r["init"], r["fraction"], r["draw"]) for r in used} == set(ids)
    png = client.download_artifacts(report.run_id, f"{folder}/plots/auc.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "out" / "tables" / "absolute.csv")
    assert {"init", "protocol", "fraction", "metric", "point", "lo", "hi"} <= set(csv.columns)
    # a second report finds only the fine-tune runs, not the first report run
    again = build_report(EXP, out=tmp_path / "out2", n_replicates=50, seed=1, log_to_mlflow=False)
    assert len(again.runs) == len(ids)

    # what the UI shows: a telling name, a description, summary metrics
    assert run.info.run_name == "report-pleural_effusion-nih"
    note = run.data.tags["mlflow.note.content"]
    assert "Task pleural_effusion on dataset nih" in note and "mean over 2 draws" in note
    assert f"**Open `{folder}/report.html`**" in note  # the file the MLflow UI shows as a page
    metrics = run.data.metrics
    assert (
        metrics["report/n_runs"] == 8 and metrics["report/n_cells"] == 4 and metrics["report/revision"] == 1
    )
    assert metrics["report/n_test_images"] == 8 and metrics["report/n_test_patients"] == 4
    assert metrics["improvement/linear_vs_random/auc_frac0.1"] == pytest.approx(0.96875 - 0.75)
    assert metrics["absolute/moco_linear/auc_frac1"] == pytest.approx(1.0)


def test_rerunning_a_report_updates_its_run(store, tmp_path):
    """The same report again: the same run, new files and metrics at step 2; other settings: another run."""
    _toy_runs()
    first = build_report(EXP, out=tmp_path / "a", n_replicates=30, seed=1, progress=False)
    client = MlflowClient()
    client.log_text(first.run_id, "left over", "stale.txt")  # a file the next revision does not write
    y, rng = _synthetic(n=8)
    for init in ("random", "moco"):  # a new fraction joins the experiment
        for d in (0, 1):
            _log_run(_predictions(Y8, S8[1.0 if init == "moco" else 0.875]), init=init, fraction=0.01, draw=d)
    second = build_report(EXP, out=tmp_path / "b", n_replicates=30, seed=1, progress=False)
    assert second.run_id == first.run_id
    reports = client.search_runs(
        [client.get_experiment_by_name(EXP).experiment_id], "tags.`mococxr.kind` = 'report'"
    )
    assert len(reports) == 1
    run = reports[0]
    assert run.info.status == "FINISHED" and run.data.metrics["report/n_runs"] == 12
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "report/n_runs")] == [
        (1, 8),
        (2, 12),
    ]
    assert run.data.metrics["improvement/linear_vs_random/auc_frac0.01"] == pytest.approx(0.125)
    folder = report_dir(run.info.run_id)
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == {folder}  # stale.txt is gone
    assert f"{folder}/report.md" in {f.path for f in client.list_artifacts(run.info.run_id, folder)}
    used = json.loads(
        open(client.download_artifacts(run.info.run_id, f"{folder}/runs.json", str(tmp_path / "dl"))).read()
    )
    assert len(used["runs"]) == 12

    other = build_report(EXP, out=tmp_path / "c", n_replicates=30, seed=2, progress=False)  # another seed
    assert other.run_id != first.run_id


def test_phantom_is_named_as_such(store, tmp_path):
    """The phantom param names it; a run without the param is recognised by the demo's marker file."""
    marked = tmp_path / "phantom-root"
    marked.mkdir()
    (marked / MARKER).write_text("demo\n")
    y, rng = _synthetic(n=40)
    _log_run(
        _predictions(y, rng.random(y.size)), init="random", dataset="chexpert", params={"phantom": "True"}
    )
    legacy = {
        "phantom": None,
        "data.root": str(marked),
        "data.test_csv": "None",
        "data.test": "0.2",
        "data.split_seed": "0",
    }
    _log_run(
        _predictions(y, rng.random(y.size)),
        init="random",
        dataset="chexpert",
        experiment="report-legacy",
        params=legacy,
    )
    for experiment in (EXP, "report-legacy"):
        report = build_report(experiment, out=tmp_path / experiment, n_replicates=20, log_to_mlflow=False)
        assert report.context.phantom and "dataset chexpert (synthetic phantom" in format_report(report)
    assert "a patient-level split (0.2 of patients, split seed 0)" in report.context.test_text()


def test_a_corrupt_predictions_file_is_named_and_never_cached(store, tmp_path, capsys):
    y, rng = _synthetic(n=40)
    good = _log_run(_predictions(y, rng.random(y.size)), init="random")
    bad = _log_run(_predictions(y, rng.random(y.size)), init="moco")
    client = MlflowClient()
    broken = tmp_path / "broken" / "test.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"PAR1 this is not parquet")
    client.log_artifact(bad, str(broken), "predictions")
    cache = tmp_path / "cache"
    kw = {"n_replicates": 20, "log_to_mlflow": False, "cache_dir": cache, "progress": False}
    with pytest.raises(
        DataError, match=f"run {bad}: artifact predictions/test.parquet is not a readable parquet"
    ):
        build_report(EXP, out=tmp_path / "out", **kw)
    assert not (cache / f"{bad}.parquet").exists() and (cache / f"{good}.parquet").is_file()
    from mococxr import cli

    assert cli.main(["report", "--experiment", EXP, "--out", str(tmp_path / "cli"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar: one line
    assert (
        err.startswith("mococxr: error: ") and bad in err and err.count("\n") == 1 and "Traceback" not in err
    )

    # fixed in MLflow: the next report reads it (the failure was not cached)
    ma.log_parquet(_predictions(y, rng.random(y.size)), "predictions/test.parquet", run_id=bad)
    assert len(build_report(EXP, out=tmp_path / "out", **kw).runs) == 2
    (cache / f"{bad}.parquet").write_bytes(b"damaged on disk")  # a damaged cache entry is fetched again
    assert len(build_report(EXP, out=tmp_path / "out", **kw).runs) == 2


def test_out_naming_a_file_is_a_config_error(store, tmp_path):
    _log_run(_predictions(*_synthetic(n=20)[:1], np.linspace(0, 1, 20)), init="random")
    existing = tmp_path / "report.txt"
    existing.write_text("not a folder")
    with pytest.raises(ConfigError, match="is an existing file, not a folder"):
        build_report(EXP, out=existing, log_to_mlflow=False)


def test_seed_reproduces_numbers_and_a_new_seed_moves_only_the_intervals(store, tmp_path):
    y, rng = _synthetic()
    for init, gain in (("random", 0.5), ("moco", 1.5)):
        for f in (0.1, 1.0):
            for d in range(2):
                _log_run(_predictions(y, y * gain + rng.normal(size=y.size)), init=init, fraction=f, draw=d)
    kw = {"n_replicates": 100, "log_to_mlflow": False, "cache_dir": tmp_path / "cache"}
    a = build_report(EXP, out=tmp_path / "a", seed=0, **kw)
    c = build_report(EXP, out=tmp_path / "c", seed=1, **kw)
    np.testing.assert_allclose(a.absolute["point"], c.absolute["point"], atol=1e-15)
    assert not np.allclose(a.absolute["lo"], c.absolute["lo"])
    assert not np.allclose(a.improvement["hi"], c.improvement["hi"])
    # the same seed again, served by the prediction cache alone (every artifact removed from the store)
    shutil.rmtree(tmp_path / "artifacts")
    b = build_report(EXP, out=tmp_path / "b", seed=0, **kw)
    pd.testing.assert_frame_equal(a.absolute, b.absolute)
    pd.testing.assert_frame_equal(a.improvement, b.improvement)


def test_improvement_sign_follows_the_better_model(store, tmp_path):
    y, rng = _synthetic(n=240)
    for init, gain in (("random", 0.2), ("imagenet", 0.6), ("moco", 2.0)):
        for protocol in ("linear", "e2e"):
            for f in (0.01, 1.0):
                _log_run(
                    _predictions(y, y * gain + rng.normal(size=y.size)),
                    init=init,
                    protocol=protocol,
                    fraction=f,
                )
    report = build_report(EXP, out=tmp_path / "out", n_replicates=200, groups="patient", log_to_mlflow=False)
    imp = report.improvement
    assert set(imp["comparison"]) == {
        f"moco {a} - {b} {c}"
        for b in ("random", "imagenet")
        for a, c in (("e2e", "e2e"), ("linear", "linear"), ("linear", "e2e"))
    }
    assert len(imp) == 6 * 2 * 2  # comparisons x fractions x metrics
    assert (imp["point"] > 0).all() and (imp["lo"] > 0).all() and (imp["frac_greater"] > 0.97).all()
    assert wide_table(imp, "auc").iloc[0, 2].startswith("+0.")  # signed: a difference


def test_multitask_runs_get_one_table_per_task(store, tmp_path):
    y, rng = _synthetic(n=90)
    y2 = np.where(np.arange(y.size) % 5 == 0, np.nan, (np.arange(y.size) % 2).astype(float))
    expected = {}
    for init in ("random", "moco"):
        s1, s2 = y + rng.normal(size=y.size), np.nan_to_num(y2) + rng.normal(size=y.size)
        preds = _predictions(y, s1).assign(**{"label:Cardiomegaly": y2, "score:Cardiomegaly": s2})
        _log_run(preds, init=init, task="Effusion,Cardiomegaly")
        known = ~np.isnan(y2)
        expected[init] = (
            roc_auc_score(y, s1),
            roc_auc_score(y2[known], s2[known]),
            average_precision_score(y2[known], s2[known]),
        )
    report = build_report(EXP, out=tmp_path / "out", n_replicates=50, log_to_mlflow=False)
    assert set(report.per_task) == {"Effusion", "Cardiomegaly"}
    for init, (auc1, auc2, ap2) in expected.items():
        card = report.per_task["Cardiomegaly"].set_index(["init", "metric"])
        assert card.loc[(init, "auc"), "point"] == pytest.approx(auc2, abs=1e-12)
        assert card.loc[(init, "auprc"), "point"] == pytest.approx(ap2, abs=1e-12)
        mean = report.absolute.set_index(["init", "metric"])
        assert mean.loc[(init, "auc"), "point"] == pytest.approx((auc1 + auc2) / 2, abs=1e-12)
    assert (report.absolute["task"] == "mean").all()
    assert (tmp_path / "out" / "tables" / "absolute_auc_Cardiomegaly.tex").is_file()


def test_guards_refuse_different_test_sets_and_missing_cells(store, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrackingError, match="report-test"):
        build_report(EXP, out=out, log_to_mlflow=False)  # experiment does not exist yet
    y, rng = _synthetic(n=40)
    with pytest.raises(ConfigError, match="groups"):
        build_report(EXP, out=out, groups="study", log_to_mlflow=False)
    base = _log_run(_predictions(y, rng.random(y.size)), init="random")
    with pytest.raises(
        TrackingError, match=r"no FINISHED runs in experiment 'report-test' with .*backbone=densenet121"
    ):
        build_report(EXP, out=out, backbone="densenet121", log_to_mlflow=False)

    other = _log_run(_predictions(y, rng.random(y.size)), init="moco", sha="sha-other")
    with pytest.raises(DataError, match="different test sets") as err:
        build_report(EXP, out=out, log_to_mlflow=False)
    assert base in str(err.value) and other in str(err.value)

    # same manifest tag, but the image ids differ (e.g. a hand-edited store)
    shifted = _predictions(y, rng.random(y.size), image_ids=[f"x{i}" for i in range(y.size)])
    odd = _log_run(shifted, init="moco", experiment="report-images")
    _log_run(_predictions(y, rng.random(y.size)), init="random", experiment="report-images")
    with pytest.raises(DataError, match="different test images") as err:
        build_report("report-images", out=out, log_to_mlflow=False)
    assert odd in str(err.value)

    # a fraction present for random but not for moco, and a draw missing at another fraction
    for init, f, d in (("random", 0.1, 0), ("random", 0.1, 1), ("random", 1.0, 0), ("moco", 0.1, 0)):
        _log_run(
            _predictions(y, rng.random(y.size)), init=init, fraction=f, draw=d, experiment="report-cells"
        )
    with pytest.raises(DataError, match="missing runs") as err:
        build_report("report-cells", out=out, log_to_mlflow=False)
    msg = str(err.value)
    assert "resnet18/moco/linear/1: no runs" in msg
    assert "resnet18/moco/linear/0.1: draws [1] missing" in msg

    # two finished runs claiming the same cell and draw
    first = _log_run(_predictions(y, rng.random(y.size)), init="random", experiment="report-dup")
    second = _log_run(_predictions(y, rng.random(y.size)), init="random", experiment="report-dup")
    with pytest.raises(DataError, match="same cell and draw") as err:
        build_report("report-dup", out=out, log_to_mlflow=False)
    assert first in str(err.value) and second in str(err.value)


def test_treatment_and_baseline_are_the_grids_labels(store, tmp_path):
    """A MoCo init labelled other than "moco" is named, not silently dropped from the improvement table."""
    _toy_runs({"moco": "moco-v2"})
    kw = {"n_replicates": 20, "log_to_mlflow": False, "cache_dir": tmp_path / "cache"}
    with pytest.raises(
        ConfigError, match=r"treatment init 'moco'; the runs carry inits \['moco-v2', 'random'\]"
    ):
        build_report(EXP, out=tmp_path / "a", **kw)
    with pytest.raises(
        ConfigError,
        match=r"baseline inits \['imagenet'\] to compare 'moco-v2' against; "
        r"the runs carry inits \['moco-v2', 'random'\]",
    ):
        build_report(EXP, out=tmp_path / "b", treatment="moco-v2", baseline="imagenet", **kw)

    report = build_report(EXP, out=tmp_path / "c", treatment="moco-v2", tracking_uri=store, **kw)
    assert list(report.improvement["comparison"].unique()) == ["moco-v2 linear - random linear"]
    imp = report.improvement[report.improvement.metric == "auc"].set_index("fraction")
    assert imp.loc[0.1, "point"] == pytest.approx(0.96875 - 0.75)
    assert list(wide_table(report.absolute, "auc")["Init"]) == ["random", "moco-v2"]

    # treatment=None: absolute numbers only, the same as with a comparison
    alone = build_report(EXP, out=tmp_path / "d", treatment=None, **kw)
    assert alone.improvement.empty and "AUC difference" not in format_report(alone)
    pd.testing.assert_frame_equal(alone.absolute, report.absolute)
    with pytest.raises(ConfigError, match="not both"):
        build_report(EXP, out=tmp_path / "e", store=mt.current_store(), tracking_uri=store, **kw)


def test_runs_of_one_init_have_absolute_numbers_only(store, tmp_path):
    """Nothing to compare is not an error: the improvement table is empty, as it always was."""
    y, rng = _synthetic(n=40)
    for f in (0.1, 1.0):
        _log_run(_predictions(y, y + rng.normal(size=y.size)), init="moco-v2", fraction=f)
    report = build_report(EXP, out=tmp_path / "out", n_replicates=20, log_to_mlflow=False)
    assert report.improvement.empty and len(report.absolute) == 2 * 2  # fractions x metrics
    assert (tmp_path / "out" / "tables" / "improvement.csv").is_file()
