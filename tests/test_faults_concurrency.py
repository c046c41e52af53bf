"""Faults and concurrency through the real command: grids started together, a grid killed mid-cell, a
pretraining run stopped with SIGTERM (`python -m mococxr` subprocesses on one sqlite store and a 60-image,
32 px phantom, one epoch per run; slow because each process imports torch and MLflow), then a dry run
(the work queue's own rules are tested in-process in test_queue.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mococxr.data.phantom import synthesize
from mococxr.tracking import mlflow as mt

EXPERIMENT = "test-faults"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("faults") / "ph", 60, size=32, seed=2)


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "MOCOCXR_ARTIFACT_ROOT": str(tmp / "artifacts"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _grid(tmp: Path, root: Path, epochs: int = 1) -> str:
    spec = {
        "name": "faults",
        "experiment": EXPERIMENT,
        "base": {
            "data": {
                "dataset": "chexpert",
                "root": str(root),
                "task": "pleural_effusion",
                "val": 0.25,
                "test": 0.25,
            },
            "image_size": 32,
            "batch_size": 16,
            "epochs": epochs,
            "workers": 0,
        },
        "inits": {"random": "random"},
        "protocols": ["linear", "e2e"],
        "fractions": [1.0],
        "draws": 1,
        "heartbeat": {"interval": 1, "grace_period": 3},
    }  # a dead worker's cell is handed on after 3 s
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _mococxr(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mococxr", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _runs(tmp: Path, kind: str = "finetune") -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return (
        [] if exp is None else client.search_runs([exp.experiment_id], f"tags.`{mt.tag('kind')}` = '{kind}'")
    )


def _assert_one_finished_per_cell(tmp: Path, cells: int = 2) -> list:
    runs = _runs(tmp)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == cells, [(r.info.run_id, r.info.status) for r in runs]
    assert len({r.data.tags[mt.tag("config_hash")] for r in finished}) == cells
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return runs


@pytest.mark.slow
def test_two_grids_started_together_run_each_cell_once(tmp_path, phantom):
    env, spec = _env(tmp_path), _grid(tmp_path, phantom)
    procs = [_mococxr("grid", spec, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    _assert_one_finished_per_cell(tmp_path)
    parents = _runs(tmp_path, "grid")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["grid/n_finished"] == 2 and parents[0].data.metrics["grid/n_cells"] == 2
    assert "Fine-tune grid" in parents[0].data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_grid_killed_mid_cell_is_taken_over(tmp_path, phantom):
    env, spec = _env(tmp_path), _grid(tmp_path, phantom, epochs=3)
    proc = _mococxr("grid", spec, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a cell's fine-tune has started logging
        if any(r.info.status == "RUNNING" and r.data.params for r in _runs(tmp_path)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [r.info.status for r in _runs(tmp_path)] == ["RUNNING"]
    again = subprocess.run(
        [sys.executable, "-m", "mococxr", "grid", spec], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    runs = _assert_one_finished_per_cell(tmp_path)
    dead = [r for r in runs if r.info.status in ("FAILED", "KILLED")]
    assert len(dead) == 1 and "stopped sending heartbeats" in dead[0].data.tags[mt.tag("end_reason")]
    assert "queued a retry" in again.stdout


@pytest.mark.slow
def test_sigterm_during_pretraining_marks_the_run_killed(tmp_path, phantom):
    env = _env(tmp_path)
    proc = _mococxr(
        "pretrain",
        "--root",
        str(phantom),
        "--experiment",
        EXPERIMENT,
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--moco-k",
        "16",
        "--epochs",
        "50",
        "--workers",
        "0",
        "--init",
        "random",
        env=env,
    )  # --init random: no "init auto fell back" line beside the one under test
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _runs(tmp_path, "pretrain"):
        time.sleep(0.2)
    time.sleep(1.0)  # inside the first epochs
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("mococxr: "), err[-2000:]
    [run] = _runs(tmp_path, "pretrain")
    assert run.info.status == "KILLED"


def test_grid_dry_run_writes_nothing(tmp_path, phantom, tracking_uri, capsys):
    from mococxr.sweep.grid import load_grid, run_grid

    mt.open_store()
    result = run_grid(load_grid(_grid(tmp_path, phantom)), dry_run=True)
    assert (result.would_run, result.skipped, result.parent_run_id) == (2, 0, "")
    assert capsys.readouterr().out.count(": would run") == 2
    assert MlflowClient().get_experiment_by_name(EXPERIMENT) is None
    assert [e.name for e in MlflowClient().search_experiments()] == ["Default"]
