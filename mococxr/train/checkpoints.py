"""Epoch checkpoints and the resume point of a pretraining run, both kept in MLflow.

Two kinds of file, both plain state dicts (``torch.load(..., weights_only=True)``):
- every epoch's query encoder, as an MLflow 3 LoggedModel (see ``tracking.mlflow.log_state_dict_model``);
- the full training state (both encoders, queue and pointer, optimizer, scheduler, RNG, epoch, the
  epoch's metrics) as the run artifact ``resume/epoch_NNNN.pt``. A new one is written before the older
  one is deleted, so a crash at any instant leaves at least one complete resume point.

The order within an epoch is: LoggedModel -> resume state -> metrics. ``reconcile`` repairs whatever
a crash between two of these left behind, so a resumed run ends with exactly one checkpoint and one
metric value per epoch.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.config import parse_keep
from mococxr.errors import ConfigError, DataError, TrackingError
from mococxr.models.backbones import load_state_dict_file
from mococxr.tracking.mlflow import tag

RESUME_DIR = "resume"
_RESUME_FILE = re.compile(r"epoch_(\d+)\.pt$")


def retained(keep: str, history: Mapping[int, Mapping[str, float]]) -> set[int]:
    """Epochs whose checkpoints retention keeps, given per-epoch metrics. The latest is always kept."""
    mode, k, metric = parse_keep(keep)
    epochs = sorted(history)
    if not epochs:
        return set()
    if mode == "all":
        return set(epochs)
    if mode == "every":
        return {e for e in epochs if e % k == 0} | {epochs[-1]}
    scored = [e for e in epochs if metric in history[e]]
    if not scored and epochs:
        raise ConfigError(f"keep={keep!r}: metric {metric!r} is not logged; logged: {sorted(history[epochs[-1]])}")
    best = sorted(scored, key=lambda e: (-history[e][metric], e))[:k]
    return set(best) | {epochs[-1]}


def run_models(run_id: str) -> list[Any]:
    """All LoggedModels a run has logged (any status)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    return list(
        client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
    )


def model_epoch(model: Any) -> int:
    return int(model.tags.get(tag("checkpoint_epoch"), -1))


def apply_retention(run_id: str, keep: str, history: Mapping[int, Mapping[str, float]]) -> None:
    """Delete the epoch checkpoints that ``keep`` no longer retains."""
    if keep == "all":
        return
    kept = retained(keep, history)
    client = MlflowClient()
    for model in run_models(run_id):
        if model_epoch(model) not in kept:
            client.delete_logged_model(model.model_id)


def save_resume_state(run_id: str, epoch: int, state: Mapping[str, Any]) -> None:
    """Write the resume point for ``epoch`` and then remove the older ones."""
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"epoch_{epoch:04d}.pt"
        torch.save(dict(state), path)
        client.log_artifact(run_id, str(path), RESUME_DIR)
    for info in client.list_artifacts(run_id, RESUME_DIR):
        m = _RESUME_FILE.search(info.path)
        if m and int(m.group(1)) < epoch:
            _delete_artifact(run_id, info.path)


def _delete_artifact(run_id: str, path: str) -> None:
    repo_uri = MlflowClient().get_run(run_id).info.artifact_uri
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(repo_uri).delete_artifacts(path)
    except (MlflowException, NotImplementedError, OSError):
        pass  # an old resume file left behind costs disk, never correctness


def load_resume_state(run_id: str) -> dict[str, Any] | None:
    """The newest complete resume state of a run, or ``None`` if it has none yet.

    A file truncated by a crash fails to load and the next older one is used.
    """
    client = MlflowClient()
    try:
        infos = client.list_artifacts(run_id, RESUME_DIR)
    except MlflowException as exc:
        raise TrackingError(f"cannot read run {run_id}: {exc.message}") from exc
    candidates = sorted(
        ((int(m.group(1)), i.path) for i in infos if (m := _RESUME_FILE.search(i.path))), reverse=True
    )
    for _, path in candidates:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
            return load_state_dict_file(local, what=f"resume point {path} of run {run_id}", nested=False)
        except (DataError, MlflowException, OSError):  # truncated by a crash mid-write: try the previous epoch
            continue
    return None


def reconcile(run_id: str, last_epoch: int, last_metrics: Mapping[str, float] | None) -> None:
    """Make a crashed run consistent with its resume point at ``last_epoch``.

    Deletes checkpoints of epochs after ``last_epoch`` (and any not READY), and logs the resume
    point's metrics if the crash came before they were logged.
    """
    client = MlflowClient()
    for model in run_models(run_id):
        if model_epoch(model) > last_epoch or "READY" not in str(model.status):
            client.delete_logged_model(model.model_id)
    if last_epoch >= 1 and last_metrics:
        history = client.get_metric_history(run_id, "train/loss")
        if not any(m.step == last_epoch for m in history):
            kept = [m for m in run_models(run_id) if model_epoch(m) == last_epoch]
            mlflow.log_metrics(
                dict(last_metrics), step=last_epoch, run_id=run_id,
                model_id=kept[0].model_id if kept else None,
            )
