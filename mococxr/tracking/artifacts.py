"""Logging plain data to a run: JSON, DataFrames, dataset inputs, and state dicts as MLflow 3 LoggedModels.

A copy into a local artifact folder that fails halfway (a full disk) leaves no truncated file behind,
and a checkpoint whose copy failed is marked FAILED, so nothing reads it by its ``models:/`` URI. A
state dict logged from a run is that run's *output* at its step (the run page lists it as Output with
its epoch), and is named with its step first (``e03-...``): MLflow's tables cut a long name at its end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput, RunOutputs
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import TrackingError
from mococxr.tracking.mlflow import NOTE_TAG, tag

PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's switch for its download bars
STATE_DICT_FILE = "state_dict.pt"
MODEL_INFO_FILE = "mococxr_model.json"
_EPOCH_SUFFIX = re.compile(r"-epoch\d+$")  # the older "<label>-epochNNN" checkpoint names
_TRIAL_SUFFIX = re.compile(r"^(?P<study>.+)-(?P<trial>trial\d+)$")  # a study trial's run name


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """Artifact downloads without MLflow's per-file progress bar (noise for one file, one long line in a
    log file; a caller that downloads many files draws its own bar over all of them)."""
    old = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = old


def log_json(obj: Any, artifact_file: str, run_id: str | None = None) -> None:
    """Log a JSON-serialisable object as ``artifact_file`` of the run."""
    run_id = run_id or _active_run_id()
    with _no_partial_file(run_id, artifact_file):
        MlflowClient().log_dict(run_id, obj, artifact_file)


def log_inputs(datasets: list, contexts: list[str], attempts: int = 5) -> None:
    """``mlflow.log_inputs`` into the active run, safe when several runs log the same new dataset at once.

    MLflow's SQL store looks a dataset up by (experiment, name, digest) and inserts it when missing, in
    one transaction: two workers of a grid or study that log the same new dataset together both miss it,
    and the second insert fails on the unique key (measured: 26 of 30 two-thread rounds on sqlite). The
    failed transaction is rolled back, so trying again finds the other run's row and links to it.
    """
    for attempt in range(attempts):
        try:
            mlflow.log_inputs(datasets, contexts=contexts, tags_list=[None] * len(datasets))
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not _lost_dataset_race(exc):
                raise
            time.sleep(0.05 * (attempt + 1))


def _lost_dataset_race(exc: MlflowException) -> bool:
    """A unique-key failure inserting into the datasets table (sqlite's or PostgreSQL's wording, locally or
    relayed by a tracking server), nothing else."""
    text = str(exc)
    return "INSERT INTO datasets" in text and ("UNIQUE constraint failed" in text or "duplicate key" in text)


@contextmanager
def _no_partial_file(run_id: str, artifact_file: str) -> Iterator[None]:
    """A copy into a local artifact folder that fails (full disk) leaves a truncated file: remove it."""
    try:
        yield
    except OSError:
        uri = MlflowClient().get_run(run_id).info.artifact_uri
        if uri and uri.startswith("file:"):
            Path(unquote(urlparse(uri).path), artifact_file).unlink(missing_ok=True)
        raise


def log_parquet(df: pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None:
    """Log a DataFrame as a parquet artifact (used for per-image predictions and manifests)."""
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / path.name
        df.to_parquet(local, index=False)
        parent = str(path.parent) if str(path.parent) != "." else None
        run_id = run_id or _active_run_id()
        with _no_partial_file(run_id, artifact_file):
            MlflowClient().log_artifact(run_id, str(local), parent)


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("no active MLflow run to log to")
    return run.info.run_id


def _remove_local(artifact_uri: str | None) -> None:
    """Delete a local artifact folder's contents (file: URIs only; a server's artifacts are its own)."""
    if artifact_uri and artifact_uri.startswith("file:"):
        shutil.rmtree(unquote(urlparse(artifact_uri).path), ignore_errors=True)


def checkpoint_name(label: str, step: int) -> str:
    """A state dict's LoggedModel name: its step first, then what it is of, so that the part that tells a
    run's checkpoints apart survives MLflow's tables, which cut a long name at its end.

    ``label`` is the run's label (its name); a trailing ``-epochNNN`` (the older naming) is dropped and a
    study trial's ``<study>-trialNNN`` reads ``trialNNN-<study>``: ``e03-trial001-mystudy``.
    """
    label = _EPOCH_SUFFIX.sub("", label)
    if m := _TRIAL_SUFFIX.match(label):
        label = f"{m.group('trial')}-{m.group('study')}"
    return f"e{step:02d}-{model_name_part(label)}"


def model_name_part(text: str) -> str:
    """``text`` as a LoggedModel name may hold it: MLflow refuses ``/ : . % " '`` there (and nowhere else a
    user's name goes), so ``10%`` reads ``10pct``, ``0.1`` reads ``0p1`` and the others become ``-``;
    backslashes and unicode stay."""
    return re.sub(r"[/:\"']", "-", text.replace("%", "pct").replace(".", "p"))


def log_model_output(run_id: str, model_id: str, step: int) -> None:
    """Record ``model_id`` as an output of run ``run_id`` at ``step`` (the run page's Type Output, Step).

    The active run's cached copy is updated as MLflow's own ``log_model`` does: ``mlflow.log_metrics(...,
    model_id=...)`` reads that copy, and logs a model it does not find among the run's outputs as an
    *input* of the run.
    """
    output = LoggedModelOutput(model_id, step=step)
    MlflowClient().log_outputs(run_id, models=[output])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        if active.outputs is None:
            active._outputs = RunOutputs(model_outputs=[output])
        else:
            active.outputs.model_outputs.append(output)


def log_state_dict_model(
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str,
    run_id: str,
    experiment_id: str,
    step: int,
    info: Mapping[str, Any],
    model_tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    description: str | None = None,
    model_type: str = "mococxr-encoder",
) -> str:
    """Log a plain state dict as an MLflow 3 LoggedModel, an output of run ``run_id`` at ``step``, and
    return its ``model_id``.

    The model's artifacts are ``state_dict.pt`` (load with ``torch.load(..., weights_only=True)``)
    and ``mococxr_model.json`` (``info``: backbone, epoch, ...). No pickled objects, no flavor: a
    checkpoint is data, and whoever loads it chooses the code that reads it. ``name`` says what the
    state dict is of (the run's label); the model is named :func:`checkpoint_name` of it. ``description``
    is the model page's Markdown description; ``model_type`` says what the weights are (an encoder, or a
    fine-tuned classifier).
    """
    client = MlflowClient()
    note = {NOTE_TAG: description} if description else {}
    model = client.create_logged_model(
        experiment_id=experiment_id,
        name=checkpoint_name(name, step),
        source_run_id=run_id,
        tags={**(model_tags or {}), tag("checkpoint_epoch"): str(step), **note},
        params={k: str(v) for k, v in (params or {}).items()},
        model_type=model_type,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(dict(state_dict), Path(tmp) / STATE_DICT_FILE)
            (Path(tmp) / MODEL_INFO_FILE).write_text(json.dumps({**info, "step": step}, indent=1))
            client.log_model_artifacts(model.model_id, tmp)
    except BaseException:
        # A copy that failed halfway (full disk) leaves a truncated state_dict.pt: remove it, so that
        # nothing reads it by its models:/ URI, and mark the model FAILED (resolvers use READY ones).
        _remove_local(model.artifact_location)
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    log_model_output(run_id, model.model_id, step)
    return model.model_id
