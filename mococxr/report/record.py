"""The report as an MLflow run: one run per report, updated in place when the same report is re-run.

A report is identified by what decides its numbers: the experiment, the run filters, the comparison
and the bootstrap settings. Their hash is the run's ``mococxr.config_hash`` tag; re-running the same
report finds that run (``mococxr.kind=report`` plus the hash), replaces its artifacts and logs its
metrics again at the next step (``report/revision``), so the experiment holds one report run per
report, its metric history shows how the numbers moved as fine-tune runs were added, and its
description and files are always the latest. Updating was chosen over marking older runs superseded:
superseded runs still pile up in the run list and every search for "the report" must skip them.
A report with other settings (another seed, filter or baseline) is another run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from mococxr.tracking import mlflow as mt

REVISION = "report/revision"
NOTE_TAG = "mlflow.note.content"


def report_key(experiment: str, settings: Mapping[str, Any]) -> str:
    """The hash that identifies a report: experiment and every setting that changes its numbers."""
    blob = json.dumps({"experiment": experiment, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_report_run(experiment_id: str, key: str) -> tuple[str | None, int]:
    """(the report run for ``key``, its last revision); the oldest when two were made at once."""
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{mt.tag('kind')}` = 'report' and tags.`{mt.tag('config_hash')}` = '{key}'",
        order_by=["attributes.start_time ASC"], max_results=10,
    )
    if not runs:
        return None, 0
    return runs[0].info.run_id, int(runs[0].data.metrics.get(REVISION, 0))


def log_report(experiment: str, out: Path, paths: Sequence[Path], *, key: str, run_name: str,
               run_tags: Mapping[str, str], params: Mapping[str, Any], metrics: Mapping[str, float],
               note: str) -> str:
    """Create or update the report run for ``key``: tags, description, params, metrics and files."""
    exp_id = mt.ensure_experiment(experiment)
    run_id, revision = find_report_run(exp_id, key)
    tags = {**run_tags, mt.tag("config_hash"): key, NOTE_TAG: note}
    with mt.start_run(experiment, run_name=run_name, run_tags=tags, run_id=run_id) as run:
        if run_id is not None:
            mlflow.set_tags({**tags, "mlflow.runName": run_name})
            _clear_artifacts(run.info.artifact_uri)
        mlflow.log_params(params)  # the settings in the key: identical on every revision
        mlflow.log_metrics({**metrics, REVISION: revision + 1}, step=revision + 1)
        with tempfile.TemporaryDirectory() as tmp:  # one upload of the whole tree, without the cache
            for path in paths:
                dest = Path(tmp) / path.relative_to(out)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            mlflow.log_artifacts(tmp)
        return run.info.run_id


def _clear_artifacts(artifact_uri: str) -> None:
    """Drop the previous revision's files, so none that this revision no longer writes lingers.

    Stores that cannot delete (some artifact servers) keep them; every file this revision writes is
    overwritten either way.
    """
    try:
        get_artifact_repository(artifact_uri).delete_artifacts()
    except (MlflowException, NotImplementedError, OSError):
        pass
