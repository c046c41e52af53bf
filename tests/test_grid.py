"""The fine-tune grid: YAML validation, one parent run, idempotent re-runs, failed cells redone."""

from __future__ import annotations

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mococxr.config import config_hash
from mococxr.data.phantom import synthesize
from mococxr.errors import ConfigError
from mococxr.models.backbones import build_encoder
from mococxr.sweep.grid import load_grid, run_grid
from mococxr.tracking import mlflow as mt
from mococxr.train import finetune as ft

EXPERIMENT = "test-grid"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return str(synthesize(tmp_path_factory.mktemp("phantom") / "ph", 160, size=64))


def write_grid(path, root: str, **changes) -> str:
    grid = {
        "name": "tiny",
        "experiment": EXPERIMENT,
        "base": {
            "data": {
                "dataset": "chexpert",
                "root": root,
                "task": "pleural_effusion",
                "val": 0.25,
                "test": 0.2,
            },
            "image_size": 64,
            "batch_size": 32,
            "epochs": 1,
            "lr": 1e-3,
        },
        "inits": {"random": "random"},
        "protocols": ["linear", "e2e"],
        "fractions": [0.25, 0.5],
        "draws": 2,
        **changes,
    }
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def finetune_runs(experiment: str = EXPERIMENT) -> list:
    exp = MlflowClient().get_experiment_by_name(experiment)
    return mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{mt.tag('kind')}` = 'finetune'", output_format="list"
    )


def test_load_grid_expands_and_validates(tmp_path):
    spec = load_grid(write_grid(tmp_path / "g.yaml", "ph", draws={0.25: 3, 0.5: 1}), {"image_size": "32"})
    jobs = spec.configs()
    assert len(jobs) == 2 * (3 + 1)
    assert all(cfg.image_size == 32 and cfg.experiment == EXPERIMENT for _, cfg in jobs)
    assert [cfg.fraction for _, cfg in jobs] == sorted(
        cfg.fraction for _, cfg in jobs
    )  # small fractions first
    assert len({config_hash(cfg) for _, cfg in jobs}) == len(jobs)
    for changes, message in (
        ({"protocols": ["linear", "knn"]}, "protocols"),
        ({"fractions": [0.0, 0.5]}, "fractions"),
        ({"draws": {0.25: 2}}, "draws gives no count"),
        ({"inits": []}, "inits"),
        ({"epochz": 3}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_grid(write_grid(tmp_path / "bad.yaml", "ph", **changes))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_grid(write_grid(tmp_path / "g2.yaml", "ph"), {"data.nope": "1"})


@pytest.mark.slow
def test_grid_runs_once_under_one_parent_and_redoes_failed_cells(
    phantom, tmp_path, tracking_uri, monkeypatch
):
    """2 inits x 2 protocols x 2 fractions x 2 draws = 16 runs; re-running starts none, except failed ones."""
    torch.manual_seed(7)
    checkpoint = tmp_path / "encoder.pt"
    torch.save(build_encoder("resnet18").state_dict(), checkpoint)
    spec = load_grid(
        write_grid(tmp_path / "grid.yaml", phantom, inits={"random": "random", "ckpt": str(checkpoint)})
    )

    table = ft.prediction_table
    calls = {"n": 0}

    def fail_third(*args, **kwargs):  # the third cell dies after training, inside its MLflow run
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return table(*args, **kwargs)

    monkeypatch.setattr(ft, "prediction_table", fail_third)
    first = run_grid(spec, progress=False)
    assert (first.started, first.skipped, len(first.failed)) == (15, 0, 1)
    assert "injected failure" in first.failed[0]
    runs = finetune_runs()
    assert len(runs) == 16 and sum(r.info.status == "FAILED" for r in runs) == 1

    parent = MlflowClient().get_run(first.parent_run_id)
    assert parent.data.tags[mt.tag("kind")] == "grid"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {first.parent_run_id}
    assert {r.data.tags[mt.tag("init")] for r in runs} == {"random", "ckpt"}
    assert {r.data.tags[mt.tag("grid")] for r in runs} == {"tiny"}
    cells = {
        (
            r.data.tags[mt.tag("init")],
            r.data.tags[mt.tag("protocol")],
            r.data.tags[mt.tag("label_fraction")],
            r.data.tags[mt.tag("draw")],
        )
        for r in runs
    }
    assert len(cells) == 16
    # one split for the whole grid: every run was scored on the same test set
    assert len({r.data.tags[mt.tag("test_manifest_sha256")] for r in runs}) == 1

    second = run_grid(spec, progress=False)  # only the failed cell runs again
    assert (second.started, second.skipped, second.failed) == (1, 15, [])
    assert second.parent_run_id == first.parent_run_id
    runs = finetune_runs()
    assert len(runs) == 17 and sum(r.info.status == "FINISHED" for r in runs) == 16

    third = run_grid(spec, progress=False)
    assert (third.started, third.skipped, third.failed) == (0, 16, [])
    assert len(finetune_runs()) == 17
    assert sorted(third.run_ids) == sorted(r.info.run_id for r in runs if r.info.status == "FINISHED")
