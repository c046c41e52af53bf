"""Nothing a user owns is overwritten or deleted: the fault probe's data-loss paths, replayed.

- the phantom is written only into a folder it made: a phantom plan or `data synth` pointed at a real
  dataset is one line, exit 2, and the folder is byte-for-byte unchanged;
- a resume records its budget (`--epochs`) before training, `--resume-from` deletes no READY checkpoint
  it does not retrain, and a resume that has nothing to do says why;
- a resume on a read-only artifact store fails before anything in the run changes;
- the process-pool workers of `data synth` die with it when it is SIGKILLed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
from cli_errors import one_error as _one_error
from mlflow.tracking import MlflowClient

from mococxr.cli import main
from mococxr.config import PretrainConfig, build
from mococxr.data.phantom import MARKER, is_phantom_of, synthesize
from mococxr.train import checkpoints
from mococxr.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
PHANTOM_PLAN = REPO / "sweeps" / "paper_phantom.yaml"


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256: what 'unchanged' is checked against."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def real_chexpert(tmp_path_factory) -> Path:
    """A dataset the user owns, in CheXpert's layout with CheXpert's own file names (no phantom marker)."""
    root = tmp_path_factory.mktemp("owned") / "chexpert"
    synthesize(root, 40, size=32, seed=7, n_valid=20)
    (root / MARKER).unlink()
    (root / "notes.txt").write_text("the user's own file\n")
    return root


@pytest.fixture(scope="module")
def real_shenzhen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("owned") / "shenzhen"
    synthesize(root, 30, size=32, seed=7, layout="shenzhen")
    (root / MARKER).unlink()
    return root


# -- 1. the phantom never writes into a data root it did not create ------------------------------------------
@pytest.mark.parametrize("flag", ["--chexpert-root", "--shenzhen-root"])
def test_phantom_plan_refuses_a_real_dataset_and_changes_no_byte(
    flag, real_chexpert, real_shenzhen, tmp_path, tracking_uri, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    real = real_chexpert if flag == "--chexpert-root" else real_shenzhen
    before = _tree(real)
    code = main(["paper", str(PHANTOM_PLAN), "--only", "data", flag, str(real)])
    _one_error(capsys, code, str(real), MARKER)
    assert _tree(real) == before
    assert not Path("data").exists()  # the other layout was not written either: every root is checked first


def test_a_relative_root_is_refused_the_same_way(real_chexpert, tmp_path, tracking_uri, monkeypatch, capsys):
    monkeypatch.chdir(real_chexpert.parent)
    before = _tree(real_chexpert)
    code = main(
        [
            "paper",
            str(PHANTOM_PLAN),
            "--only",
            "data",
            "--chexpert-root",
            real_chexpert.name,
            "--shenzhen-root",
            str(tmp_path / "sz"),
        ]
    )
    _one_error(capsys, code, real_chexpert.name)
    assert _tree(real_chexpert) == before and not (tmp_path / "sz").exists()


def test_data_synth_refuses_a_folder_it_did_not_make(real_chexpert, capsys):
    before = _tree(real_chexpert)
    code = main(["data", "synth", "--out", str(real_chexpert), "--n", "10", "--size", "32"])
    _one_error(capsys, code, str(real_chexpert), "never into a dataset")
    assert _tree(real_chexpert) == before


def test_the_phantom_owns_new_empty_and_its_own_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize(empty, 12, size=32, seed=1, n_valid=4)
    assert is_phantom_of(empty, 12, size=32, seed=1, n_valid=4)
    assert not is_phantom_of(empty, 12, size=32, seed=2, n_valid=4)
    synthesize(empty, 16, size=32, seed=2, n_valid=4)  # its own folder: rewritten with other parameters
    assert is_phantom_of(empty, 16, size=32, seed=2, n_valid=4)
    # an interrupted write still marks the folder as the phantom's (the marker comes first), never as complete
    (empty / MARKER).write_text("writing (interrupted if this line stays)\n")
    assert not is_phantom_of(empty, 16, size=32, seed=2, n_valid=4)
    synthesize(empty, 16, size=32, seed=2, n_valid=4)
    assert is_phantom_of(empty, 16, size=32, seed=2, n_valid=4)


def test_the_phantom_plan_writes_and_then_reuses_its_own_roots(tmp_path, tracking_uri, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["paper", str(PHANTOM_PLAN), "--only", "data"]) == 0
    roots = [tmp_path / "data" / "paper-phantom" / key for key in ("chexpert", "shenzhen")]
    trees = [_tree(r) for r in roots]
    assert all(MARKER in t for t in trees)
    capsys.readouterr()
    assert main(["paper", str(PHANTOM_PLAN), "--only", "data"]) == 0
    assert capsys.readouterr().out.count("reused") == 2 and [_tree(r) for r in roots] == trees


# -- 2. a resume records its budget, and deletes no READY checkpoint it does not retrain ---------------------
FLAGS = {
    "init": "random",
    "image_size": 32,
    "batch_size": 16,
    "moco_k": 32,
    "moco_m": 0.99,
    "lr": 1e-3,
    "scheduler": "constant",
    "workers": 0,
    "seed": 3,
    "resume_state": "keep",
}


def _config_json(run_id: str) -> dict:
    uri = MlflowClient().get_run(run_id).info.artifact_uri
    return json.loads((Path(unquote(urlparse(uri).path)) / "config.json").read_text())


def _models(run_id: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for m in checkpoints.run_models(run_id):
        out.setdefault(checkpoints.model_epoch(m), []).append(
            str(m.status).removeprefix("LoggedModelStatus.")
        )
    return out


def _loss_steps(run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, "train/loss"))


@pytest.fixture()
def one_epoch_run(tmp_path, tracking_uri):
    synthesize(tmp_path / "ph", 48, size=32, seed=1)
    cfg = build(
        PretrainConfig, {**FLAGS, "epochs": 1, "data": {"root": str(tmp_path / "ph")}, "experiment": "budget"}
    )
    return pretrain(cfg, progress=False).run_id


def test_resume_records_the_extension_and_resume_from_keeps_the_epoch_it_retrains(one_epoch_run, capsys):
    run = one_epoch_run
    assert main(["pretrain", "--resume", run, "--epochs", "3"]) == 0
    assert _config_json(run)["epochs"] == 3  # recorded: the next --resume reads 3
    assert _models(run) == {1: ["READY"], 2: ["READY"], 3: ["READY"]}
    epoch3 = [m.model_id for m in checkpoints.run_models(run) if checkpoints.model_epoch(m) == 3]
    assert (
        "Extended by a resume from the 1 epochs"
        in MlflowClient().get_run(run).data.tags["mlflow.note.content"]
    )

    # the probe's second command: retrains epoch 3 (it is in the budget) and only then replaces its checkpoint
    assert main(["pretrain", "--resume", run, "--resume-from", "2"]) == 0
    models = _models(run)
    assert models == {1: ["READY"], 2: ["READY"], 3: ["READY"]}
    new3 = [m.model_id for m in checkpoints.run_models(run) if checkpoints.model_epoch(m) == 3]
    assert new3 != epoch3  # retrained, so replaced; and a checkpoint stands behind every logged loss
    assert set(_loss_steps(run)) == {1, 2, 3} and _config_json(run)["epochs"] == 3

    # a resume with nothing left to train says so, and changes no checkpoint
    capsys.readouterr()
    assert main(["pretrain", "--resume", run]) == 0
    err = capsys.readouterr().err
    assert "already has epoch 3 of its 3; nothing to train" in err and f"--resume {run} --epochs N" in err
    assert _models(run) == models
    # a budget below what the resume point has trained is refused before anything changes
    assert main(["pretrain", "--resume", run, "--epochs", "2"]) == 2
    assert "cannot be fewer epochs" in capsys.readouterr().err and _config_json(run)["epochs"] == 3


def test_an_interrupted_extension_resumes_to_the_extended_budget(one_epoch_run, capsys):
    run = one_epoch_run

    def interrupt(epoch, encoder, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(None, resume=run, resume_epochs=4, on_epoch_end=interrupt, progress=False)
    assert MlflowClient().get_run(run).info.status == "KILLED" and _config_json(run)["epochs"] == 4
    assert main(["pretrain", "--resume", run]) == 0  # no --epochs: the recorded 4 are trained, not the old 1
    assert sorted(_models(run)) == [1, 2, 3, 4] and max(_loss_steps(run)) == 4


def test_a_resume_that_does_not_reach_an_epoch_keeps_its_ready_checkpoint(one_epoch_run):
    run = one_epoch_run
    pretrain(None, resume=run, resume_epochs=3, progress=False)
    ids = {checkpoints.model_epoch(m): m.model_id for m in checkpoints.run_models(run)}

    def interrupt(epoch, encoder, metrics):
        raise KeyboardInterrupt  # during the retraining of epoch 3, before its checkpoint is logged

    with pytest.raises(KeyboardInterrupt):
        pretrain(None, resume=run, resume_from=2, on_epoch_end=interrupt, progress=False)
    left = {checkpoints.model_epoch(m): (m.model_id, str(m.status)) for m in checkpoints.run_models(run)}
    assert {e: i for e, (i, _) in left.items()} == ids and all("READY" in s for _, s in left.values())


# -- 3. a read-only artifact store is found before anything is deleted ---------------------------------------
@pytest.mark.slow
def test_resume_on_a_read_only_artifact_store_changes_nothing(tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root and CAP_SYS_ADMIN")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(disk / "artifacts"))
        synthesize(tmp_path / "ph", 48, size=32, seed=1)
        cfg = build(
            PretrainConfig, {**FLAGS, "epochs": 2, "data": {"root": str(tmp_path / "ph")}, "experiment": "ro"}
        )
        run = pretrain(cfg, progress=False).run_id
        client = MlflowClient()
        before = (client.get_run(run).info.status, _models(run), _tree(disk))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        code = main(["pretrain", "--resume", run, "--resume-from", "1", "--epochs", "3"])
        _one_error(capsys, code, "read-only")
        assert (client.get_run(run).info.status, _models(run), _tree(disk)) == before
    finally:
        subprocess.run(["umount", str(disk)], check=False)
        mlflow.set_tracking_uri(None)


# -- 4. pool workers die with their parent -------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the workers")
def test_sigkill_during_data_synth_leaves_no_worker(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mococxr",
            "data",
            "synth",
            "--out",
            str(tmp_path / "ph"),
            "--n",
            "20000",
            "--size",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    workers: list[int] = []
    deadline = time.monotonic() + 90
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        workers = _children(proc.pid)
    assert len(workers) >= 2, f"no process-pool workers seen ({workers}); {proc.stderr.read()[-2000:]}"
    time.sleep(1.0)  # the workers are rendering
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(5)
    assert [p for p in workers if _alive(p)] == [], "process-pool workers outlived their SIGKILLed parent"


# -- 5. a full disk under --out is named as such, not as a download problem ----------------------------------
def test_a_full_disk_under_out_names_the_folder_not_the_store(tmp_path, tracking_uri, monkeypatch):
    import errno

    from mococxr.errors import user_message
    from mococxr.report import runs as report_runs

    def full(self, run_id, path, dst_path=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MlflowClient, "download_artifacts", full)
    cache = tmp_path / "out" / ".cache" / "predictions"
    with pytest.raises(OSError) as caught:
        report_runs.load_predictions(["0" * 32], cache)
    message = user_message(caught.value)
    assert message.startswith(f"no space left on the device holding {cache}") and "download" not in message
