"""The report as an MLflow run: one run per report, its files replaced atomically when the report is re-run.

A report is identified by what decides its numbers: the experiment, the run filters, the comparison
and the bootstrap settings. Their hash is the run's ``mococxr.config_hash`` tag; re-running the same
report finds that run (``mococxr.kind=report`` plus the hash), replaces its files and logs its
metrics again at the next step (``report/revision``), so the experiment holds one report run per
report, its metric history shows how the numbers moved as fine-tune runs were added, and its
description and files are always the latest. Updating was chosen over marking older runs superseded:
superseded runs still pile up in the run list and every search for "the report" must skip them.
A report with other settings (another seed, filter or baseline) is another run.

Each revision's files sit in their own artifact folder of the run, ``revision-0004/`` (:data:`REVISION_DIR`),
and the run's ``mococxr.report_files`` tag (:data:`FILES_TAG`) names the folder of the current, complete
set; readers ask :func:`report_dir`. A re-run uploads the new files into a new folder, checks that
every file arrived whole (listed, with its size), then moves the tag and the description onto that
folder, logs the metrics (``report/revision`` last, once the files are complete) and only then deletes
the older folders and the root-level files of the layout before revision folders. Deleting first and
uploading after lost the report to a SIGKILL, Ctrl-C or full disk in between; now an update stopped at
any point leaves the previous set whole and the tag on it, and the partial folder is garbage that the
next revision deletes before it uploads. A store that cannot delete (some artifact servers) keeps the
older folders; the tag still names the current one.

The run's duration is the work, not the calendar. Reopening the run for each revision would make MLflow's
duration (end time minus start time) span every wait between revisions: a report made in 2 s and re-run
an hour later would show an hour. So each revision adds the seconds it took (from when its caller began
making the report, ``log_report(started=...)``, to its upload and metrics) to the metric
:data:`WORK_SECONDS`, and once :func:`mococxr.tracking.mlflow.start_run` has ended the run FINISHED the
run's end time is set to its start time plus that total (``MlflowClient().set_terminated``): the
duration column reads the time spent making the report, all revisions together. The start time stays
when the run was created (MLflow cannot move it); the metric history of :data:`WORK_SECONDS` shows each
revision's share. A revision that fails or is interrupted keeps the end time ``start_run`` gave it.

The run's metrics describe the current revision as a whole: the callers log counters over every run
the report covers (``report/n_runs``, ``report/n_cells``), and a metric an earlier revision logged that
this one does not (a cell whose runs were deleted) is logged as NaN, so no latest value is left over from
an older state.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from mococxr.errors import TrackingError
from mococxr.tracking import filters as flt
from mococxr.tracking import mlflow as mt

REVISION = "report/revision"
WORK_SECONDS = "report/work_seconds"  # the seconds spent making the report, all revisions together
FILES_TAG = mt.tag("report_files")  # the artifact folder of the current, complete set of files
REVISION_DIR = "revision-{:04d}"  # the artifact folder of revision n
_REVISION_DIR_RE = re.compile(r"revision-(\d+)")


def report_key(experiment: str, settings: Mapping[str, Any]) -> str:
    """The hash that identifies a report: experiment and every setting that changes its numbers."""
    blob = json.dumps({"experiment": experiment, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_report_run(experiment_id: str, key: str) -> tuple[str | None, int]:
    """(the report run for ``key``, its last revision); the oldest when two were made at once."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        flt.tags(mt.tags(kind="report", config_hash=key)),
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    if not runs:
        return None, 0
    return runs[0].info.run_id, int(runs[0].data.metrics.get(REVISION, 0))


def report_dir(run_id: str) -> str:
    """The artifact folder of a report run's current files (``revision-0004``): pass it as the ``path`` of
    ``MlflowClient().list_artifacts`` and prefix it to the paths of ``download_artifacts``. ``""`` (the
    artifact root) for a run logged before revision folders, or one whose first upload never completed."""
    return MlflowClient().get_run(run_id).data.tags.get(FILES_TAG, "")


def log_report(
    experiment: str,
    out: Path,
    paths: Sequence[Path],
    *,
    key: str,
    run_name: str,
    run_tags: Mapping[str, str],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    note: str,
    started: float | None = None,
) -> str:
    """Create or update the report run for ``key``: files (``paths``, relative to ``out``, in a new revision
    folder), then tags, description and metrics; the previous revision's files stay until these are whole.

    ``started`` is the ``time.monotonic()`` at which the caller began making the report (default: now):
    the work from there on is added to the run's :data:`WORK_SECONDS`, and the run ends at its start time
    plus that total, so its duration is the work, not the time between revisions (see the module's text).
    """
    started = time.monotonic() if started is None else started
    exp_id = mt.ensure_experiment(experiment)
    run_id, revision = find_report_run(exp_id, key)
    tags = {**run_tags, mt.tag("config_hash"): key, "mlflow.runName": run_name}
    # a new run gets what finds it (kind, hash) at once; its description comes with its first complete files
    first = None if run_id is not None else {**run_tags, mt.tag("config_hash"): key}
    client = MlflowClient()
    with mt.start_run(experiment, run_name=run_name, run_tags=first, run_id=run_id) as run:
        run_id = run.info.run_id
        repo = get_artifact_repository(run.info.artifact_uri)
        before = client.get_run(run_id).data
        kept = _drop_unfinished(client, repo, run_id, before.tags.get(FILES_TAG))
        # after revision n's files were switched to, a kill may have stopped its metrics: never reuse n
        n = max([revision, *(_revision_number(f) for f in kept)]) + 1
        folder = REVISION_DIR.format(n)
        mlflow.log_params(params)  # the settings in the key: identical on every revision
        names = _upload(client, repo, run_id, out, paths, folder)
        # the switch: one request names the new folder as the current set and describes it
        mlflow.set_tags({**tags, FILES_TAG: folder, mt.NOTE_TAG: _described(note, folder, n, names)})
        mlflow.log_metrics({**_retired(before.metrics, metrics), **metrics}, step=n)
        work = before.metrics.get(WORK_SECONDS, 0.0) + (time.monotonic() - started)
        mlflow.log_metric(WORK_SECONDS, work, step=n)
        mlflow.log_metric(REVISION, n, step=n)  # last: revision n is complete
        for entry in client.list_artifacts(run_id):  # older revisions and the layout before revision folders
            if entry.path != folder:
                _delete(repo, entry.path)
    _end_after_work(client, run_id, work)
    return run_id


def _retired(logged: Mapping[str, float], metrics: Mapping[str, float]) -> dict[str, float]:
    """NaN for each metric an earlier revision logged that this one does not (a cell whose runs are gone):
    the run's latest values then describe the current report only."""
    return {k: math.nan for k in logged if k not in metrics and k not in (REVISION, WORK_SECONDS)}


def _end_after_work(client: MlflowClient, run_id: str, work: float) -> None:
    """Set the FINISHED run's end time to its start time plus ``work`` seconds (see the module's text)."""
    try:
        start = client.get_run(run_id).info.start_time
        client.set_terminated(run_id, "FINISHED", end_time=start + round(1000 * work))
    except MlflowException as exc:  # the report is complete and FINISHED; only its duration is off
        warnings.warn(f"report run {run_id}: its duration could not be set to the work ({exc})", stacklevel=3)


def _revision_number(folder: str) -> int:
    match = _REVISION_DIR_RE.fullmatch(folder)
    return int(match.group(1)) if match else 0


def _drop_unfinished(client: MlflowClient, repo, run_id: str, current: str | None) -> list[str]:
    """Delete the revision folders other than ``current`` (uploads that never completed); return the
    revision folders still there (``current`` and any the store would not delete)."""
    kept = []
    for entry in client.list_artifacts(run_id):
        if entry.is_dir and _REVISION_DIR_RE.fullmatch(entry.path):
            if entry.path == current or not _delete(repo, entry.path):
                kept.append(entry.path)
    return kept


def _upload(
    client: MlflowClient, repo, run_id: str, out: Path, paths: Sequence[Path], folder: str
) -> list[str]:
    """Upload ``paths`` as ``folder/<path relative to out>`` in one call and check every file arrived whole;
    an upload that fails is deleted (as far as the store can) and its error raised unchanged."""
    with tempfile.TemporaryDirectory() as tmp:  # one upload of the whole tree, without the cache
        sizes = {}
        for path in paths:
            rel = path.relative_to(out)
            dest = Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            sizes[rel.as_posix()] = dest.stat().st_size
        try:
            client.log_artifacts(run_id, tmp, folder)
        except BaseException:  # a full disk, Ctrl-C, a server error: the previous set stays current
            _delete(repo, folder)
            raise
    listed = _listing(client, run_id, folder)
    # a store that lists no sizes (file_size None) is checked for presence only
    bad = [
        f"{name} ({'missing' if name not in listed else f'{listed[name]} of {size} bytes'})"
        for name, size in sizes.items()
        if name not in listed or listed[name] not in (None, size)
    ]
    if bad:
        _delete(repo, folder)
        raise TrackingError(
            f"report run {run_id}: the upload of {folder}/ is incomplete: {', '.join(bad[:5])}"
            f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; the previous revision's files are kept "
            f"(tag {FILES_TAG}); rerun the report"
        )
    return sorted(sizes)


def _listing(client: MlflowClient, run_id: str, folder: str) -> dict[str, int | None]:
    """{path inside ``folder``: size in bytes} of every file under ``folder``."""
    found: dict[str, int | None] = {}
    pending = [folder]
    while pending:
        for entry in client.list_artifacts(run_id, pending.pop()):
            if entry.is_dir:
                pending.append(entry.path)
            else:
                found[entry.path.removeprefix(folder + "/")] = entry.file_size
    return found


def _described(note: str, folder: str, n: int, names: Sequence[str]) -> str:
    """The run's description: ``note``'s first paragraph, the pointer to the files, the rest of ``note`` (the
    MLflow UI shows the first lines of a description and folds the rest under "Show more")."""
    head, _, rest = note.partition("\n\n")
    return "\n\n".join(part for part in (head, _files_line(folder, n, names), rest) if part)


def _files_line(folder: str, n: int, names: Sequence[str]) -> str:
    """The description's pointer to the files: in the MLflow UI they sit one folder down. ``report.html``
    is the one to open there (the viewer shows Markdown as plain text)."""
    opener = next((f"`{folder}/{name}`" for name in ("report.html", "report.md") if name in names), None)
    return (
        f"**Open {opener}** (revision {n}); every file is in the artifact folder `{folder}/`."
        if opener
        else f"**Files** (revision {n}): in the artifact folder `{folder}/`."
    )


def _delete(repo, path: str) -> bool:
    """Delete an artifact file or folder; ``False`` where the store cannot (some artifact servers)."""
    try:
        repo.delete_artifacts(path)
    except (MlflowException, NotImplementedError, OSError):
        return False
    return True
