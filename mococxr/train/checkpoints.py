"""Epoch checkpoints and the resume point of a pretraining run, both kept in MLflow.

Two kinds of file, both plain state dicts (``torch.load(..., weights_only=True)``):
- every epoch's query encoder, as an MLflow 3 LoggedModel (see ``tracking.artifacts.log_state_dict_model``);
- the full training state (both encoders, queue and pointer, optimizer, scheduler, RNG, epoch, the
  epoch's metrics) as the run artifact ``resume/epoch_NNNN.pt``, followed by its sidecar
  ``resume/epoch_NNNN.json`` (size and sha256). A state without its sidecar is a write that did not
  finish; a state whose bytes differ from its sidecar is damaged, and resuming from it stops with an
  error that changes nothing. The newest two states are kept, so an intact earlier epoch exists to
  resume from (``--resume-from``) when the newest is damaged.

The order within an epoch is: LoggedModel -> resume state -> sidecar -> metrics. ``reconcile`` repairs
whatever a crash between two of these left behind, so a resumed run ends with exactly one checkpoint
and one metric value per epoch. Neither it nor retention ever deletes a checkpoint that a registered
model version points to: registered versions are only removed by an explicit registry command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.config import PretrainConfig, build, parse_keep
from mococxr.errors import ConfigError, DataError, TrackingError
from mococxr.models.backbones import load_state_dict_file
from mococxr.tracking import filters as flt
from mococxr.tracking.artifacts import quiet_downloads
from mococxr.tracking.mlflow import tag

RESUME_DIR = "resume"
KEEP_RESUME_STATES = 2  # the newest and the one before it: an intact epoch to fall back to
KEPT_TAG = tag("kept")  # on a checkpoint that reconcile/retention would have deleted
_RESUME_FILE = re.compile(r"epoch_(\d+)\.(pt|json)$")
_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)/?$")


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
        raise ConfigError(
            f"keep={keep!r}: metric {metric!r} is not logged; logged: {sorted(history[epochs[-1]])}"
        )
    best = sorted(scored, key=lambda e: (-history[e][metric], e))[:k]
    return set(best) | {epochs[-1]}


def run_models(run_id: str) -> list[Any]:
    """All LoggedModels a run has logged (any status)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    return list(
        client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=flt.equal("source_run_id", run_id)
        )
    )


def model_epoch(model: Any) -> int:
    return int(model.tags.get(tag("checkpoint_epoch"), -1))


# -- registered checkpoints are never deleted as a side effect ----------------------------------------
def registered_model_ids(run_id: str) -> dict[str, str]:
    """LoggedModel id -> "NAME vVERSION" for every registered model version made from run ``run_id``."""
    out: dict[str, str] = {}
    client = MlflowClient()
    token = None
    while True:
        page = client.search_model_versions(flt.equal("run_id", run_id), page_token=token)
        for mv in page:
            m = _MODEL_URI.match(mv.source or "")
            for model_id in {
                mv.model_id,
                m.group(1) if m else None,
                (mv.tags or {}).get(tag("model_id")),
            }:
                if model_id:
                    out.setdefault(model_id, f"{mv.name} v{mv.version}")
        token = page.token
        if not token:
            return out


def _delete_models(run_id: str, models: list[Any], why: str) -> None:
    """Delete ``models`` of run ``run_id``, except registered ones: those are tagged as kept instead."""
    if not models:
        return
    client = MlflowClient()
    registered = registered_model_ids(run_id)
    for model in models:
        if model.model_id in registered:
            client.set_logged_model_tags(
                model.model_id,
                {KEPT_TAG: f"registered as {registered[model.model_id]}; {why} would have deleted it"},
            )
        else:
            client.delete_logged_model(model.model_id)


def apply_retention(run_id: str, keep: str, history: Mapping[int, Mapping[str, float]]) -> None:
    """Delete the epoch checkpoints that ``keep`` no longer retains (never a registered one).

    Only epochs up to the newest in ``history`` are judged: a checkpoint of a later epoch (kept from
    before a ``--resume-from``) waits until that epoch is trained again (see :func:`supersede`)."""
    if keep == "all" or not history:
        return
    kept, newest = retained(keep, history), max(history)
    stale = [m for m in run_models(run_id) if model_epoch(m) <= newest and model_epoch(m) not in kept]
    _delete_models(run_id, stale, f"retention {keep}")


def supersede(run_id: str, epoch: int, model_id: str) -> None:
    """Epoch ``epoch`` was trained again as ``model_id``: drop the run's earlier checkpoints of that epoch.

    Called only once the new checkpoint is READY, so an interrupted retraining leaves the old one."""
    older = [m for m in run_models(run_id) if model_epoch(m) == epoch and m.model_id != model_id]
    _delete_models(run_id, older, f"retraining epoch {epoch}")


# -- resume states and their sidecars ---------------------------------------------------------------------
def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_path(epoch: int, ext: str = "pt") -> str:
    return f"{RESUME_DIR}/epoch_{epoch:04d}.{ext}"


def resume_files(run_id: str) -> dict[int, dict[str, Any]]:
    """epoch -> {"pt": FileInfo, "json": FileInfo} (either may be missing) of a run's resume states."""
    client = MlflowClient()
    try:
        client.get_run(run_id)
        infos = client.list_artifacts(run_id, RESUME_DIR)
    except MlflowException as exc:
        raise TrackingError(
            f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()} ({exc.message}); "
            "check the run id in the MLflow UI"
        ) from exc
    out: dict[int, dict[str, Any]] = {}
    for info in infos:
        if m := _RESUME_FILE.search(info.path):
            out.setdefault(int(m.group(1)), {})[m.group(2)] = info
    return out


def save_resume_state(run_id: str, epoch: int, state: Mapping[str, Any]) -> None:
    """Write the resume point for ``epoch`` and its sidecar, check both arrived, then drop the older ones.

    The two newest states stay, so a damaged newest one leaves an intact epoch to resume from.
    """
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"epoch_{epoch:04d}.pt"
        torch.save(dict(state), path)
        sidecar = {"file": path.name, "epoch": epoch, "size": path.stat().st_size, "sha256": _sha256(path)}
        client.log_artifact(run_id, str(path), RESUME_DIR)
        # written second: a state without its sidecar is a write that did not finish
        client.log_dict(run_id, sidecar, _state_path(epoch, "json"))
    files = resume_files(run_id)
    stored = files.get(epoch, {})
    size = getattr(stored.get("pt"), "file_size", None)
    if "json" not in stored or "pt" not in stored or size not in (None, sidecar["size"]):
        raise TrackingError(
            f"resume point {_state_path(epoch)} of run {run_id} was not stored completely "
            f"({size} of {sidecar['size']} bytes); is the artifact store full or unreachable?"
        )
    for old in sorted(files)[:-KEEP_RESUME_STATES]:
        for ext in ("pt", "json"):  # the state first: a sidecar left alone is ignored, never trusted
            if ext in files[old]:
                _delete_artifact(run_id, files[old][ext].path)


def delete_resume_states(run_id: str) -> None:
    """Remove every resume state of a run (it finished or was pruned); its epoch checkpoints stay."""
    for files in resume_files(run_id).values():
        for ext in ("pt", "json"):
            if ext in files:
                _delete_artifact(run_id, files[ext].path)


def _delete_artifact(run_id: str, path: str) -> None:
    repo_uri = MlflowClient().get_run(run_id).info.artifact_uri
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(repo_uri).delete_artifacts(path)
    except (MlflowException, NotImplementedError, OSError):
        pass  # an old resume file left behind costs disk, never correctness


def reconcile(run_id: str, last_epoch: int, last_metrics: Mapping[str, float] | None) -> None:
    """Make a crashed run consistent with its resume point at ``last_epoch``.

    Deletes checkpoints whose write did not finish (not READY; never a registered one) and logs the
    resume point's metrics if the crash came before they were logged. A READY checkpoint of a later
    epoch is complete data: it stays until that epoch is trained again and :func:`supersede` replaces it,
    so a resume that is interrupted, or never reaches that epoch, deletes nothing complete.
    """
    client = MlflowClient()
    stale = [m for m in run_models(run_id) if "READY" not in str(m.status)]
    _delete_models(run_id, stale, f"resuming from epoch {last_epoch}")
    if last_epoch >= 1 and last_metrics:
        history = client.get_metric_history(run_id, "train/loss")
        if not any(m.step == last_epoch for m in history):
            kept = [m for m in run_models(run_id) if model_epoch(m) == last_epoch]
            mlflow.log_metrics(
                dict(last_metrics),
                step=last_epoch,
                run_id=run_id,
                model_id=kept[0].model_id if kept else None,
            )


def has_logged_epochs(run_id: str) -> bool:
    """Whether run ``run_id`` logged the metrics of at least one epoch."""
    return bool(MlflowClient().get_metric_history(run_id, "train/loss"))


def load_resume_state(run_id: str, resume_from: int | None = None) -> dict[str, Any] | None:
    """The verified resume state to continue run ``run_id`` from, or ``None`` if it has none yet.

    ``resume_from`` picks an epoch; otherwise the newest state is used. A newest state without its
    sidecar was cut short by a crash: the one before it is used, and a line says so. A state that does
    not match its sidecar or does not load as a plain state dict raises ``DataError`` and changes nothing.
    """
    files = resume_files(run_id)
    states = sorted((e for e, f in files.items() if "pt" in f), reverse=True)
    if resume_from is not None:
        if resume_from not in states:
            raise TrackingError(
                f"run {run_id} keeps no resume point for epoch {resume_from}; it keeps "
                f"{', '.join(map(str, sorted(states))) or 'none'}"
            )
        return _verified(run_id, resume_from, files)
    for i, epoch in enumerate(states):
        if "json" in files[epoch]:
            return _verified(run_id, epoch, files)
        if i + 1 < len(states):
            say(
                f"resume point {_state_path(epoch)} of run {run_id} has no sidecar (its write was "
                f"interrupted); resuming from epoch {states[i + 1]}"
            )
            continue
        try:  # the oldest, unchecked: written before sidecars existed, or the run's first write was cut short
            return _verified(run_id, epoch, files)
        except DataError:
            say(
                f"resume point {_state_path(epoch)} of run {run_id} has no sidecar and does not load (its "
                "write was interrupted); starting again from epoch 1"
            )
    return None


def _verified(run_id: str, epoch: int, files: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Download the state of ``epoch``, check it against its sidecar (when it has one) and load it."""
    where = f"resume point {_state_path(epoch)} of run {run_id}"
    hint = _way_forward(run_id, epoch, files)
    has_sidecar = "json" in files[epoch]
    try:
        local = _download(run_id, _state_path(epoch))
        sidecar = (
            json.loads(Path(_download(run_id, _state_path(epoch, "json"))).read_text())
            if has_sidecar
            else None
        )
    except (MlflowException, OSError, ValueError) as exc:
        raise DataError(f"{where} cannot be read ({_one_line(exc)}); {hint}") from exc
    if sidecar is not None:
        size = os.path.getsize(local)
        if size != sidecar.get("size"):
            raise DataError(
                f"{where} is damaged: it has {size} bytes where its sidecar {_state_path(epoch, 'json')} "
                f"recorded {sidecar.get('size')}; {hint}"
            )
        if _sha256(local) != sidecar.get("sha256"):
            raise DataError(
                f"{where} is damaged: its sha256 differs from the one its sidecar "
                f"{_state_path(epoch, 'json')} recorded; {hint}"
            )
    try:
        state = load_state_dict_file(local, what=where, nested=False)
    except DataError as exc:
        cause = exc.__cause__ or exc
        raise DataError(
            f"{where} is not a plain state dict and was not loaded ({type(cause).__name__}: "
            f"{_one_line(cause)}); {hint}"
        ) from exc
    missing = {"epoch", "model", "optimizer", "scheduler", "scaler", "history"} - set(state)
    if missing or int(state["epoch"]) != epoch:
        raise DataError(
            f"{where} is not a resume state of epoch {epoch} (epoch {state.get('epoch')}, missing "
            f"{sorted(missing)}); {hint}"
        )
    return state


def _way_forward(run_id: str, epoch: int, files: Mapping[int, Mapping[str, Any]]) -> str:
    older = [e for e in sorted(files, reverse=True) if e < epoch and {"pt", "json"} <= set(files[e])]
    if older:
        return (
            f"nothing was changed. To continue from the intact epoch {older[0]} (later epochs are trained "
            f"again): mococxr pretrain --resume {run_id} --resume-from {older[0]}"
        )
    return (
        "nothing was changed, and no earlier resume point is kept: start a new run from one of its "
        "checkpoints (mococxr pretrain --init models:/<LoggedModel id>)"
    )


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, short: the CLI prints errors as one line."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= 200 else text[:197] + "..."


def say(line: str) -> None:
    """One line on stderr: what a resume did that the user did not ask for in so many words."""
    print(f"mococxr: {line}", file=sys.stderr, flush=True)


# -- what --resume needs ----------------------------------------------------------------------------------
def resume_point(
    run_id: str, epochs: int | None, resume_from: int | None
) -> tuple[PretrainConfig, dict | None]:
    """The config and verified resume state to continue run ``run_id`` from; raises, changing
    nothing, when the state is damaged or gone."""
    cfg = config_of_run(run_id, epochs)
    state = load_resume_state(run_id, resume_from)
    if epochs is not None and state is not None and cfg.epochs < int(state["epoch"]):
        raise ConfigError(
            f"--epochs {cfg.epochs}: run {run_id} resumes from epoch {state['epoch']}, so its budget "
            f"cannot be fewer epochs; nothing was changed"
        )
    if state is None and has_logged_epochs(run_id):
        raise TrackingError(
            f"run {run_id} has logged epochs but keeps no resume point (with resume_state=until_done it is "
            "deleted once a run finishes or is pruned); nothing was changed. Continue from one of its "
            "checkpoints in a new run: mococxr pretrain --init models:/<LoggedModel id>"
        )
    return cfg, state


def record_budget(run_id: str, config: Mapping[str, Any]) -> None:
    """Write the run's ``config.json`` as ``config`` (the resumed config, budget included) before training
    continues, so the next ``--resume`` reads the budget this one trains to.

    Also the first write of a resume: a read-only or full artifact store fails here, before anything
    is deleted. A local file is replaced atomically (a temporary file, then a rename), so a failure
    leaves the previous ``config.json`` whole; object stores replace an object in one request.
    """
    from urllib.parse import unquote, urlparse

    uri = MlflowClient().get_run(run_id).info.artifact_uri or ""
    text = json.dumps(dict(config), indent=2)  # as MlflowClient.log_dict writes it
    if uri.startswith("file:"):
        folder = Path(unquote(urlparse(uri).path))
        tmp = folder / f".config.json.tmp-{os.getpid()}"
        try:
            tmp.write_text(text)
            os.replace(tmp, folder / "config.json")
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    else:
        MlflowClient().log_text(run_id, text, "config.json")


def config_of_run(run_id: str, epochs: int | None) -> PretrainConfig:
    """The config a run was started with, so ``--resume`` needs nothing else; ``epochs`` may extend it."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(
            f"--resume {run_id}: no such MLflow run in {mlflow.get_tracking_uri()}; "
            "check the id (MLflow UI, or mlflow runs list)"
        ) from exc
    if run.data.tags.get(tag("kind")) != "pretrain":
        raise TrackingError(
            f"--resume {run_id}: run {run.info.run_name!r} is not a pretraining run "
            f"(kind {run.data.tags.get(tag('kind'))!r})"
        )
    try:
        logged = json.loads(Path(_download(run_id, "config.json")).read_text())
    except (MlflowException, OSError, ValueError) as exc:
        raise TrackingError(f"--resume {run_id}: its config.json cannot be read ({_one_line(exc)})") from exc
    if epochs is not None:
        logged["epochs"] = epochs  # built with the rest: a flag's string is checked like the config's values
    return build(PretrainConfig, logged, where=f"config.json of run {run_id} (and --epochs)")


def _download(run_id: str, path: str) -> str:
    """Download one artifact without MLflow's progress bar."""
    with quiet_downloads():
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
