"""MoCo v2 pretraining on the phantom: metrics and checkpoints in MLflow, exact resume, torchrun.

One reference run (in-process, one thread) is shared by the module: the integration checks read it,
and the kill-and-resume test must reach its weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mococxr.config import DataConfig, PretrainConfig, build, to_dict
from mococxr.console import PlainProgress, progress
from mococxr.data import prepare as prepare_module
from mococxr.data.phantom import synthesize
from mococxr.errors import ConfigError
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.train import checkpoints
from mococxr.train.pretrain import pretrain

EPOCHS = 4
# Settings under which the phantom's loss falls within a few epochs: the queue (K = 2 batches) fills
# with real keys after two steps, a fast-moving key encoder (m = 0.99) and a constant lr of 1e-3.
FLAGS = {
    "init": "random",
    "image_size": 64,
    "batch_size": 16,
    "epochs": EPOCHS,
    "moco_k": 32,
    "moco_m": 0.99,
    "lr": 1e-3,
    "scheduler": "constant",
    "workers": 0,
    "seed": 3,
    "resume_state": "keep",
}


def _cli_flags(flags: dict) -> list[str]:
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _env(store: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "MOCOCXR_ARTIFACT_ROOT": str(store / "artifacts"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store and a 120-image phantom shared by this module's runs."""
    root = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MOCOCXR_ARTIFACT_ROOT"):
            mp.setenv(key, _env(root)[key])
        synthesize(root / "phantom", 120, size=64, seed=1)
        yield root


@pytest.fixture(scope="module")
def reference(store):
    """An uninterrupted run with FLAGS, on one thread like the subprocesses below."""
    cfg = build(
        PretrainConfig, {**FLAGS, "data": {"root": str(store / "phantom")}, "experiment": "reference"}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return result


def _models_by_epoch(run_id: str) -> dict[int, list]:
    out: dict[int, list] = {}
    for model in checkpoints.run_models(run_id):
        out.setdefault(checkpoints.model_epoch(model), []).append(model)
    return out


def _assert_one_per_epoch(run_id: str, epochs: int) -> None:
    client = MlflowClient()
    models = _models_by_epoch(run_id)
    assert sorted(models) == list(range(1, epochs + 1))
    assert all(len(v) == 1 and "READY" in str(v[0].status) for v in models.values())
    for key in ("train/loss", "train/acc1", "train/lr", "train/images_per_s"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), (
            key
        )


@pytest.mark.slow
def test_loss_falls_and_every_epoch_is_logged(reference, store):
    loss = {e: h["train/loss"] for e, h in reference.history.items()}
    assert sorted(loss) == list(range(1, EPOCHS + 1))
    # Epoch 1 is easy by construction (its first step compares against the random initial queue), so the
    # learning shows from epoch 2 on.
    assert loss[EPOCHS] < loss[2] - 0.05, loss

    client = MlflowClient()
    run = client.get_run(reference.run_id)
    assert run.info.status == "FINISHED"
    _assert_one_per_epoch(reference.run_id, EPOCHS)

    # LoggedModels carry their epoch's metrics at step=epoch, found by search_logged_models
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{reference.run_id}'",
        output_format="list",
    )
    assert len(found) == EPOCHS
    for model in found:
        epoch = checkpoints.model_epoch(model)
        assert model.model_id == reference.model_ids[epoch]
        assert model.name == f"e{epoch:02d}-resnet18-{reference.run_id[:8]}"  # no run name: backbone, id
        linked = {m.key: m for m in model.metrics}
        assert linked["train/loss"].step == epoch
        assert linked["train/loss"].value == pytest.approx(loss[epoch])
        assert model.tags["mococxr.kind"] == "pretrain" and model.tags["mococxr.backbone"] == "resnet18"
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}"))
        state = torch.load(local / ma.STATE_DICT_FILE, map_location="cpu", weights_only=True)
        assert "trunk.conv1.weight" in state and "trunk.fc.weight" not in state
        info = json.loads((local / ma.MODEL_INFO_FILE).read_text())
        assert info["epoch"] == epoch and info["run_id"] == reference.run_id and info["feature_dim"] == 512

    # what defines the run: config, manifest, parameters, tags
    config = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=reference.run_id, artifact_path="config.json")
        ).read_text()
    )
    cfg = build(PretrainConfig, config)
    assert cfg.moco_k == 32 and cfg.data.root == str(store / "phantom") and to_dict(cfg) == config
    manifest = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=reference.run_id, artifact_path="manifests/pretrain.json"
            )
        ).read_text()
    )
    assert manifest["sha256"] == run.data.tags["mococxr.manifest_sha256"]
    assert len(manifest["image_ids"]) >= 64
    seen = {m.step: m.value for m in client.get_metric_history(reference.run_id, "train/images")}
    assert seen == {e: len(manifest["image_ids"]) // 16 * 16 for e in range(1, EPOCHS + 1)}
    params = run.data.params
    assert params["moco_k"] == "32" and params["data.root"] == str(store / "phantom")
    assert params["init_resolved"] == "random" and params["world_size"] == "1"
    tags = run.data.tags
    assert {
        k: tags[k]
        for k in (
            "mococxr.kind",
            "mococxr.backbone",
            "mococxr.init",
            "mococxr.dataset",
            "mococxr.image_size",
            "mococxr.preset",
        )
    } == {
        "mococxr.kind": "pretrain",
        "mococxr.backbone": "resnet18",
        "mococxr.init": "random",
        "mococxr.dataset": "chexpert",
        "mococxr.image_size": "64",
        "mococxr.preset": "cxr",
    }
    assert len(tags["mococxr.config_hash"]) == 64

    # the resume point is a plain state dict too; the newest two are kept (resume_state=keep), each with
    # its sidecar
    state = checkpoints.load_resume_state(reference.run_id)
    assert state["epoch"] == EPOCHS and "queue" in state["model"]
    names = sorted(i.path for i in client.list_artifacts(reference.run_id, checkpoints.RESUME_DIR))
    assert names == [
        f"{checkpoints.RESUME_DIR}/epoch_{e:04d}.{x}" for e in (EPOCHS - 1, EPOCHS) for x in ("json", "pt")
    ]


def test_bad_queue_length_is_a_config_error(store):
    with pytest.raises(ConfigError, match="moco_k=40 is not a multiple of batch_size=16.*try moco_k=32"):
        pretrain(
            build(PretrainConfig, {**FLAGS, "moco_k": 40, "data": {"root": str(store / "phantom")}}),
            progress=False,
        )


def test_a_monitored_run_reads_the_label_csv_once(store, monkeypatch, capsys):
    """Pretraining, its monitor and the run's manifest share one prepared dataset: one CSV parse per run."""
    reads: Counter = Counter()
    read_records = prepare_module.read_records

    def counting(dataset, root, csv=None, **kwargs):
        reads[(str(root), csv)] += 1
        return read_records(dataset, root, csv, **kwargs)

    monkeypatch.setattr(prepare_module, "read_records", counting)
    cfg = build(
        PretrainConfig,
        {
            **FLAGS,
            "epochs": 2,
            "monitor": True,
            "experiment": "read-once",
            "data": {"root": str(store / "phantom"), "val": 0.25, "test": 0.2},
            "run_name": "study-trial002",
            "resume_state": "until_done",
        },
    )
    result = pretrain(cfg, progress=False, extra_tags=mt.tags(optuna_study="study", optuna_trial=2))
    assert sorted(result.history) == [1, 2]
    assert all("val/linear_auc" in h for h in result.history.values())  # the monitor ran every epoch
    assert reads == {(str(store / "phantom"), None): 1}
    _check_what_the_ui_shows(result, cfg, capsys.readouterr().out)


def _check_what_the_ui_shows(result, cfg, out: str) -> None:
    """Names, summary metrics, description, dataset input and progress lines of a sweep-like trial."""
    client = MlflowClient()
    run = client.get_run(result.run_id)
    models = checkpoints.run_models(result.run_id)
    names = {checkpoints.model_epoch(m): m.name for m in models}
    assert names == {1: "e01-trial002-study", 2: "e02-trial002-study"}  # the epoch first, then the trial
    # its checkpoints are the run's outputs at their epoch (the run page: Type Output, Step), never inputs
    assert {o.model_id: o.step for o in run.outputs.model_outputs} == {
        m.model_id: checkpoints.model_epoch(m) for m in models
    }
    assert not run.inputs.model_inputs
    auc = {e: h["val/linear_auc"] for e, h in result.history.items()}
    best = max(sorted(auc), key=lambda e: auc[e])
    assert run.data.metrics["best/val_linear_auc"] == pytest.approx(auc[best])
    assert run.data.metrics["best/epoch"] == best
    assert [m.step for m in client.get_metric_history(result.run_id, "best/epoch")] == [0, 0]  # no step
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(
        "MoCo v2 pretraining of resnet18 (random init) on chexpert/pleural_effusion: 2 epochs"
    )
    assert "Trial 2 of the Optuna study 'study'" in note and "adam lr 0.001" in note
    (dataset_input,) = run.inputs.dataset_inputs
    manifest = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="manifests/pretrain.json")
        ).read_text()
    )
    assert (
        dataset_input.dataset.name == "pretrain" and dataset_input.dataset.digest == manifest["sha256"][:32]
    )
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == len(manifest["image_ids"])
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "pretrain"
    assert "[study-trial002] epoch 2/2  loss" in out
    # finished with resume_state=until_done: no resume point left, every checkpoint kept
    assert client.list_artifacts(result.run_id, checkpoints.RESUME_DIR) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_plain_line_unless_on_a_terminal():
    out = io.StringIO()
    bar = progress(range(3), "[demo-trial002] pretrain epoch 1/4", every_s=0, file=out)
    assert isinstance(bar, PlainProgress)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[-1].startswith("[demo-trial002] pretrain epoch 1/4: 3/3 (") and lines[-1].endswith(
        "loss 2.0"
    )
    quiet = io.StringIO()
    assert list(progress(range(500), "fast", file=quiet)) == list(range(500))
    assert quiet.getvalue() == ""  # at most one line per 10 s
    assert not isinstance(progress(range(3), "tty", file=_Terminal()), PlainProgress)  # a tqdm bar
    assert list(progress(range(3), "off", enabled=False, file=out)) == [0, 1, 2]


def _wait_for_epoch_1(proc: subprocess.Popen, artifacts: Path, experiment_dir: str, timeout: float = 240):
    """Block until epoch 1's resume point appears, polling fast enough that epoch 2 cannot end first.

    The kill then lands between epoch 1's resume point and its metrics, or early in epoch 2: both
    are crashes resume must repair (see checkpoints.reconcile).
    """
    deadline = time.monotonic() + timeout
    pattern = f"{experiment_dir}/*/artifacts/{checkpoints.RESUME_DIR}/epoch_0001.pt"
    while not list(artifacts.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(reference, store):
    env = _env(store)
    cmd = [
        sys.executable,
        "-m",
        "mococxr",
        "pretrain",
        "--root",
        str(store / "phantom"),
        "--experiment",
        "killed",
        *_cli_flags(FLAGS),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_epoch_1(proc, store / "artifacts", "killed")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=["killed"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"  # a killed process leaves it running
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] in ([], [1])

    done = subprocess.run(
        [sys.executable, "-m", "mococxr", "pretrain", "--resume", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"pretraining run {run_id}: {EPOCHS} epoch(s) logged" in done.stdout

    assert len(mlflow.search_runs(experiment_names=["killed"], output_format="list")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    _assert_one_per_epoch(run_id, EPOCHS)
    resumed, uninterrupted = (
        checkpoints.load_resume_state(run_id),
        checkpoints.load_resume_state(reference.run_id),
    )
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    different = [
        k for k in resumed["model"] if not torch.equal(resumed["model"][k], uninterrupted["model"][k])
    ]
    assert not different, different[:5]
    # the same holds for every epoch's logged encoder, and for the metrics of the resumed epochs
    for epoch, model_id in reference.model_ids.items():
        (mine,) = _models_by_epoch(run_id)[epoch]
        a = torch.load(
            Path(mlflow.artifacts.download_artifacts(f"models:/{mine.model_id}")) / ma.STATE_DICT_FILE,
            weights_only=True,
        )
        b = torch.load(
            Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}")) / ma.STATE_DICT_FILE,
            weights_only=True,
        )
        assert all(torch.equal(a[k], b[k]) for k in b), epoch
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses == pytest.approx({e: h["train/loss"] for e, h in reference.history.items()}, abs=1e-12)


@pytest.mark.slow
def test_torchrun_two_processes_killed_and_resumed(store):
    """DDP on CPU (gloo): only rank 0 logs, both ranks agree on the run, and a resume continues it."""
    env = _env(store)
    flags = {**FLAGS, "epochs": 2}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [
        *torchrun,
        "-m",
        "mococxr",
        "pretrain",
        "--root",
        str(store / "phantom"),
        "--experiment",
        "ddp",
        *_cli_flags(flags),
    ]
    # its own session, so SIGKILL reaches the agent and both workers at once, like a lost machine
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for_epoch_1(proc, store / "artifacts", "ddp")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    runs = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert runs[0].data.params["world_size"] == "2"

    done = subprocess.run(
        [*torchrun, "-m", "mococxr", "pretrain", "--resume", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"pretraining run {run_id}: 2 epoch(s) logged") == 1  # rank 0 alone reports
    assert "destroy_process_group" not in done.stderr
    runs = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    _assert_one_per_epoch(run_id, 2)
    # the ranks shared each epoch (DistributedSampler): together they saw as many images as one process
    single = {m.step: m.value for m in MlflowClient().get_metric_history(run_id, "train/images")}
    assert single == {1: len(_manifest_ids(run_id)) // 16 * 16, 2: len(_manifest_ids(run_id)) // 16 * 16}


def _manifest_ids(run_id: str) -> list[str]:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="manifests/pretrain.json")
    return json.loads(Path(path).read_text())["image_ids"]


@pytest.mark.realdata
@pytest.mark.slow
def test_pretrain_on_the_nih_sample(nih_sample, tracking_uri):
    cfg = build(
        PretrainConfig,
        {
            "data": to_dict(DataConfig(dataset="nih", root=str(nih_sample), task="Effusion")),
            "init": "random",
            "image_size": 64,
            "batch_size": 16,
            "epochs": 2,
            "moco_k": 64,
            "lr": 1e-3,
            "workers": 0,
            "experiment": "nih",
        },
    )
    data = prepare_module.prepare(cfg.data)
    # decoding 2000 px PNGs bounds the time, not the model; the manifest follows the table it describes
    data = dataclasses.replace(data, pretrain=data.pretrain.head(160))
    result = pretrain(cfg, data=data, progress=False)
    _assert_one_per_epoch(result.run_id, 2)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in result.history.values())
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mococxr.dataset"] == "nih" and run.info.status == "FINISHED"
