"""A report run's files are replaced atomically (mococxr/report/record.py): an update killed (SIGKILL,
Ctrl-C) or out of disk mid-upload leaves the previous complete set in place with the run's pointer on it,
and the next update deletes the partial folder and completes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pytest
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient
from PIL import Image
from test_report import _migrated_db, store  # noqa: F401  (a fresh sqlite store per test)

from mococxr.errors import TrackingError, user_message
from mococxr.report.record import FILES_TAG, REVISION, log_report, report_dir
from mococxr.tracking import mlflow as mt

EXP = "faults-report"
KEY = "faults-key"
NAME = "report-faults"
pytestmark = pytest.mark.usefixtures("store")


def _write(out: Path, version: int, png_side: int = 256) -> tuple[Path, list[Path]]:
    """A small report under ``out/v<version>``: report.md, runs.json, tables/t.csv and figure4.png, a noise
    PNG of ~3 x png_side² bytes (196 KB at 256: it does not compress), every file saying its version."""
    folder = out / f"v{version}"
    (folder / "tables").mkdir(parents=True)
    (folder / "report.md").write_text(f"# report version {version}\n")
    (folder / "runs.json").write_text(f'{{"version": {version}}}\n')
    (folder / "tables" / "t.csv").write_text(f"version\n{version}\n")
    noise = np.random.default_rng(version).integers(0, 256, (png_side, png_side, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "figure4.png")
    return folder, sorted(p for p in folder.rglob("*") if p.is_file())


def _log(folder: Path, paths: list[Path], version: int) -> str:
    return log_report(
        EXP,
        folder,
        paths,
        key=KEY,
        run_name=NAME,
        run_tags=mt.tags(kind="report"),
        params={"seed": 0},
        metrics={"report/n_runs": float(version)},
        note=f"version {version}",
    )


def _artifacts(run_id: str) -> Path:
    """The run's local artifact folder (a sqlite store keeps them on disk)."""
    return Path(unquote(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _current(run_id: str) -> dict[str, bytes]:
    """The current set's files, byte for byte, as paths inside its folder."""
    return _snapshot(_artifacts(run_id) / report_dir(run_id))


def _the_report_run() -> mlflow.entities.Run:
    client = MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name(EXP).experiment_id], "tags.`mococxr.kind` = 'report'"
    )
    return run


def _root(run_id: str) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run_id)}


def _history(run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, REVISION)]


def _one_complete_revision(tmp_path) -> tuple[str, dict[str, bytes]]:
    folder, paths = _write(tmp_path / "out", 1)
    run_id = _log(folder, paths, 1)
    assert report_dir(run_id) == "revision-0001" and _current(run_id) == _snapshot(folder)
    return run_id, _current(run_id)


def _assert_first_revision_intact(run_id: str, before: dict[str, bytes]) -> None:
    run = MlflowClient().get_run(run_id)
    assert report_dir(run_id) == "revision-0001"
    assert _current(run_id) == before  # every file, byte for byte
    assert run.data.metrics[REVISION] == 1 and run.data.metrics["report/n_runs"] == 1
    assert (
        run.data.tags[mt.NOTE_TAG].startswith("version 1")
        and "`revision-0001/`" in run.data.tags[mt.NOTE_TAG]
    )


def _assert_second_revision_only(run_id: str, folder: Path, *, number: int = 2) -> None:
    name = f"revision-{number:04d}"
    run = _the_report_run()
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert report_dir(run_id) == name and _root(run_id) == {name}  # older and partial folders are gone
    assert _current(run_id) == _snapshot(folder)
    assert _history(run_id) == [(1, 1.0), (number, float(number))]
    assert (
        run.data.tags[mt.NOTE_TAG].startswith("version 2")
        and f"`{name}/report.md`" in run.data.tags[mt.NOTE_TAG]
    )


# -- the ordinary path ---------------------------------------------------------------------------------------
def test_a_rerun_keeps_one_run_with_only_the_current_revision_folder(tmp_path):
    run_id, _ = _one_complete_revision(tmp_path)
    assert _root(run_id) == {"revision-0001"} and _history(run_id) == [(1, 1.0)]
    folder, paths = _write(tmp_path / "out", 2)
    assert _log(folder, paths, 2) == run_id
    _assert_second_revision_only(run_id, folder)
    assert MlflowClient().get_run(run_id).data.tags[FILES_TAG] == "revision-0002"
    assert not (_artifacts(run_id) / "revision-0001").exists()  # deleted, not just unlisted


def test_a_run_of_the_root_layout_moves_into_a_revision_folder(tmp_path):
    """A report run logged before revision folders (files at the artifact root, revision 1) is read at the
    root until its next revision, which moves its files into revision-0002/ and removes the root ones."""
    old, old_paths = _write(tmp_path / "out", 1)
    tags = {**mt.tags(kind="report", config_hash=KEY), mt.NOTE_TAG: "version 1"}
    with mt.start_run(EXP, run_name=NAME, run_tags=tags) as run:
        mlflow.log_artifacts(str(old))
        mlflow.log_metric(REVISION, 1, step=1)
    assert report_dir(run.info.run_id) == "" and _current(run.info.run_id) == _snapshot(old)
    folder, paths = _write(tmp_path / "out", 2)
    assert _log(folder, paths, 2) == run.info.run_id
    _assert_second_revision_only(run.info.run_id, folder)


def test_a_store_that_cannot_delete_keeps_old_folders_and_points_at_the_new_one(tmp_path, monkeypatch):
    def refuse(self, artifact_path=None):
        raise NotImplementedError("this store cannot delete")

    monkeypatch.setattr(LocalArtifactRepository, "delete_artifacts", refuse)
    run_id, before = _one_complete_revision(tmp_path)
    folder, paths = _write(tmp_path / "out", 2)
    _log(folder, paths, 2)
    assert _root(run_id) == {"revision-0001", "revision-0002"}
    assert report_dir(run_id) == "revision-0002" and _current(run_id) == _snapshot(folder)
    assert _snapshot(_artifacts(run_id) / "revision-0001") == before
    # an upload that fails leaves a partial folder the store cannot delete: the next one takes a new number
    with monkeypatch.context() as patch:
        patch.setattr(
            LocalArtifactRepository, "log_artifacts", _copy_some_then(OSError(errno.EIO, "I/O error"))
        )
        with pytest.raises(OSError):
            _log(*_write(tmp_path / "out", 3), 3)
    assert report_dir(run_id) == "revision-0002" and (_artifacts(run_id) / "revision-0003").is_dir()
    last, last_paths = _write(tmp_path / "out", 4)
    _log(last, last_paths, 4)
    assert report_dir(run_id) == "revision-0004" and _current(run_id) == _snapshot(last)
    assert _history(run_id) == [(1, 1), (2, 2), (4, 4)]
    monkeypatch.undo()  # the store deletes again: the next revision leaves only its own folder
    _log(*_write(tmp_path / "out", 5), 5)
    assert _root(run_id) == {"revision-0005"} and _history(run_id) == [(1, 1), (2, 2), (4, 4), (5, 5)]


# -- interrupted uploads, deterministic: the repository's upload copies some files, then fails ---------------
def _copy_some_then(exc: BaseException):
    """LocalArtifactRepository.log_artifacts that copies report.md, then 24,576 of figure4.png's bytes (what
    the fault probe found), then raises ``exc``."""

    def broken(self, local_dir, artifact_path=None):
        dest = Path(self.artifact_dir, artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "report.md").write_bytes(Path(local_dir, "report.md").read_bytes())
        (dest / "figure4.png").write_bytes(Path(local_dir, "figure4.png").read_bytes()[:24_576])
        raise exc

    return broken


@pytest.mark.parametrize(
    "exc, status",
    [(KeyboardInterrupt(), "KILLED"), (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "FAILED")],
    ids=["ctrl-c", "full-disk"],
)
def test_an_interrupted_upload_keeps_the_previous_set_and_the_next_one_completes(
    exc, status, tmp_path, monkeypatch
):
    run_id, before = _one_complete_revision(tmp_path)
    folder, paths = _write(tmp_path / "out", 2)
    with monkeypatch.context() as patch:
        patch.setattr(LocalArtifactRepository, "log_artifacts", _copy_some_then(exc))
        with pytest.raises(type(exc)) as raised:
            _log(folder, paths, 2)
    assert raised.value is exc  # the error as the existing code gave it, unwrapped
    if isinstance(exc, OSError):
        assert user_message(raised.value).startswith("no space left on the device")  # the CLI's one line
    _assert_first_revision_intact(run_id, before)
    assert MlflowClient().get_run(run_id).info.status == status
    assert _log(folder, paths, 2) == run_id
    _assert_second_revision_only(run_id, folder)


def test_an_upload_that_lists_a_short_file_is_refused_and_the_previous_set_kept(tmp_path, monkeypatch):
    run_id, before = _one_complete_revision(tmp_path)
    folder, paths = _write(tmp_path / "out", 2)
    original = LocalArtifactRepository.log_artifacts

    def silently_short(self, local_dir, artifact_path=None):  # a store that drops bytes without an error
        original(self, local_dir, artifact_path)
        png = Path(self.artifact_dir, artifact_path, "figure4.png")
        png.write_bytes(png.read_bytes()[:24_576])

    with monkeypatch.context() as patch:
        patch.setattr(LocalArtifactRepository, "log_artifacts", silently_short)
        with pytest.raises(
            TrackingError, match=r"revision-0002/ is incomplete: figure4\.png \(24576 of \d+ bytes\)"
        ):
            _log(folder, paths, 2)
    _assert_first_revision_intact(run_id, before)
    assert _root(run_id) == {"revision-0001"}  # the short upload is deleted at once


def test_a_kill_after_the_switch_before_the_revision_metric_never_reuses_the_number(tmp_path, monkeypatch):
    """Files switched to revision-0002 but ``report/revision`` still 1: the next revision is 3, not a
    second 2."""
    run_id, _ = _one_complete_revision(tmp_path)
    folder, paths = _write(tmp_path / "out", 2)
    original = mlflow.log_metric

    def killed_at_revision(key, *args, **kwargs):
        if key == REVISION:
            raise KeyboardInterrupt
        return original(key, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "log_metric", killed_at_revision)
        with pytest.raises(KeyboardInterrupt):
            _log(folder, paths, 2)
    assert report_dir(run_id) == "revision-0002" and _current(run_id) == _snapshot(folder)
    assert _history(run_id) == [(1, 1.0)]
    again, again_paths = _write(tmp_path / "again", 2)
    _log(again, again_paths, 2)
    _assert_second_revision_only(run_id, again, number=3)


# -- interrupted uploads, for real: SIGKILL to a process mid-upload; a full tmpfs ----------------------------
CHILD = """
import os, sys, time
from pathlib import Path

import mlflow.store.artifact.local_artifact_repo as local


def slow_copytree(src, dst):  # a slow disk (16 KiB every 20 ms), so that the kill lands mid-upload
    for dirpath, _, names in os.walk(src):
        for name in sorted(names):
            source = Path(dirpath, name)
            target = Path(dst, source.relative_to(src))
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as r, open(target, "wb") as w:
                while chunk := r.read(16384):
                    w.write(chunk)
                    w.flush()
                    time.sleep(0.02)


local.shutil_copytree_without_file_permissions = slow_copytree
from mococxr.report.record import log_report
from mococxr.tracking import mlflow as mt

mt.open_store()
out = Path(sys.argv[1])
paths = sorted(p for p in out.rglob("*") if p.is_file())
log_report({exp!r}, out, paths, key={key!r}, run_name={name!r}, run_tags=mt.tags(kind="report"),
           params={{"seed": 0}}, metrics={{"report/n_runs": 2.0}}, note="version 2")
"""


def test_sigkill_mid_upload_keeps_the_previous_set_and_the_next_run_completes(tmp_path):
    run_id, before = _one_complete_revision(tmp_path)
    folder, _ = _write(tmp_path / "out", 2)
    partial = _artifacts(run_id) / "revision-0002"
    code = CHILD.format(exp=EXP, key=KEY, name=NAME)
    # the child inherits MLFLOW_TRACKING_URI and MOCOCXR_ARTIFACT_ROOT: this test's store
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (partial.is_dir() and any(p.is_file() for p in partial.rglob("*"))):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the new revision folder never appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(partial) != _snapshot(folder)  # killed mid-upload: the new folder is partial
    _assert_first_revision_intact(run_id, before)
    # its owner died mid-update; the next run of the report takes it over
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"

    again, again_paths = _write(tmp_path / "again", 2)
    assert _log(again, again_paths, 2) == run_id
    _assert_second_revision_only(run_id, again)


@pytest.fixture()
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root and CAP_SYS_ADMIN; skipped otherwise), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_keeps_the_previous_set_and_gives_the_one_line_error(small_disk, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(small_disk / "artifacts"))  # before the experiment exists
    run_id, before = _one_complete_revision(tmp_path)  # ~197 KB of 400 KiB
    assert _artifacts(run_id).is_relative_to(small_disk)
    folder, paths = _write(tmp_path / "out", 2, png_side=320)  # ~307 KB more: does not fit
    with pytest.raises(OSError) as raised:
        _log(folder, paths, 2)
    assert raised.value.errno == errno.ENOSPC
    assert user_message(raised.value).startswith("no space left on the device")
    _assert_first_revision_intact(run_id, before)
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    assert _root(run_id) == {"revision-0001"}  # the partial upload is deleted, its space freed

    smaller, smaller_paths = _write(tmp_path / "again", 2, png_side=128)  # fits beside revision 1
    assert _log(smaller, smaller_paths, 2) == run_id
    _assert_second_revision_only(run_id, smaller)
