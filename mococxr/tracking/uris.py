"""Checkpoint references -> the registered version behind them and a local file.

A reference is ``models:/NAME@alias``, ``models:/NAME/Alias`` (MLflow's old stage spelling, the same
alias), ``models:/NAME/3``, ``models:/m-<id>`` (a LoggedModel), ``runs:/<run_id>/<path>`` or a local
file. :func:`resolve_path` downloads what a reference points to and hands back the local
``state_dict.pt`` with what is known of its origin; the caller loads it (``train/inits.py``) and hands the
state dict to the backbone builder, so tracking knows nothing of models and models nothing of MLflow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.config import ALIASES  # the aliases a version is promoted to
from mococxr.errors import TrackingError
from mococxr.tracking.artifacts import MODEL_INFO_FILE, STATE_DICT_FILE
from mococxr.tracking.mlflow import tag

ARCHIVED = "archived"  # not an alias: a version is archived by removing its aliases and tagging it
PROMOTIONS = (*ALIASES, ARCHIVED)
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<ref>[^/]+)/?$")  # a number or an alias
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")


def check_alias(value: str) -> str:
    """``value`` lower-cased when it is one of :data:`PROMOTIONS`, else the one clear error."""
    alias = value.lower()
    if alias not in PROMOTIONS:
        raise TrackingError(f"unknown stage {value!r}; use one of {', '.join(PROMOTIONS)}")
    return alias


def canonical_uri(uri: str) -> str:
    """Translate ``models:/NAME/Production`` (MLflow's stage spelling) to ``models:/NAME@production``."""
    m = _VERSION_URI.match(uri)
    if m and not m.group("ref").isdigit() and not uri.startswith("models:/m-"):
        return f"models:/{m.group('name')}@{check_alias(m.group('ref'))}"
    return uri


def resolve_path(ref: str) -> tuple[Path, dict[str, Any]]:
    """Any checkpoint reference -> (local state dict file, info); nothing is loaded.

    ``info`` holds what is known of its origin (uri, run id, epoch, registry version, backbone). A local
    file is returned as given: a missing or unreadable one is the loader's error, like any other file.
    """
    info: dict[str, Any] = {"uri": ref}
    if ref.startswith(("models:/", "runs:/")):
        uri = canonical_uri(ref)
        info.update(version_info(uri))
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri))
        except MlflowException as exc:
            raise TrackingError(
                f"cannot resolve {ref!r} in {mlflow.get_tracking_uri()}: {exc.message}"
            ) from exc
    else:
        local = Path(ref)
    if local.is_dir():
        if (local / MODEL_INFO_FILE).is_file():
            info.update(json.loads((local / MODEL_INFO_FILE).read_text()))
        local = local / STATE_DICT_FILE
        if not local.is_file():
            raise TrackingError(f"{ref!r} holds no {STATE_DICT_FILE}; is it a mococxr checkpoint?")
    return local, info


def version_info(uri: str) -> dict[str, Any]:
    """Registry version, run id and epoch behind a models:/ or runs:/ URI (as canonical_uri spells it)."""
    client = MlflowClient()
    mv = None
    try:
        if m := _ALIAS_URI.match(uri):
            mv = client.get_model_version_by_alias(m.group("name"), m.group("alias"))
        elif (m := _VERSION_URI.match(uri)) and m.group("ref").isdigit():
            mv = client.get_model_version(m.group("name"), m.group("ref"))
    except MlflowException as exc:
        raise TrackingError(f"cannot resolve {uri!r} in {mlflow.get_tracking_uri()}: {exc.message}") from exc
    if mv is None:
        return _unregistered_info(client, uri)
    require_logged_model(client, mv, f"use {uri}")
    return {
        "registered_model": mv.name,
        "registry_version": str(mv.version),
        "run_id": mv.tags.get(tag("run_id"), mv.run_id),
        "epoch": _epoch(mv.tags.get(tag("checkpoint_epoch"))),
        "model_id": model_id(mv),
    }


def _unregistered_info(client: MlflowClient, uri: str) -> dict[str, Any]:
    """What a ``models:/m-<id>`` or ``runs:/`` URI says of its origin without a registered version."""
    if uri.startswith("models:/m-"):
        try:
            model = client.get_logged_model(uri.removeprefix("models:/").strip("/"))
        except MlflowException as exc:  # unknown, or deleted
            raise TrackingError(
                f"cannot resolve {uri!r} in {mlflow.get_tracking_uri()}: {exc.message}"
            ) from exc
        return {
            "run_id": model.source_run_id,
            "epoch": _epoch(model.tags.get(tag("checkpoint_epoch"))),
            "model_id": model.model_id,
        }
    if uri.startswith("runs:/"):
        return {"run_id": uri.removeprefix("runs:/").split("/", 1)[0]}
    return {}


def _epoch(value: str | None) -> int | None:
    """Epoch tags are strings; ``info["epoch"]`` is an int whichever source filled it."""
    return int(value) if value not in (None, "") else None


def model_id(mv) -> str | None:
    """The LoggedModel behind a registered version: its tag, MLflow's field, or a ``models:/m-...`` source."""
    source = mv.source or ""
    from_source = source.removeprefix("models:/").strip("/") if source.startswith("models:/m-") else None
    return mv.tags.get(tag("model_id")) or getattr(mv, "model_id", None) or from_source


def require_logged_model(client: MlflowClient, mv, doing: str) -> None:
    """Refuse a version whose LoggedModel was deleted: its weights are no longer a checkpoint of the store.

    MLflow keeps the version (and the files) when the LoggedModel is deleted; ``get_logged_model`` then
    answers RESOURCE_DOES_NOT_EXIST, which is what is checked here."""
    logged = model_id(mv)
    if not logged:
        return  # registered from a run's artifacts: no LoggedModel to check
    try:
        client.get_logged_model(logged)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(
            f"registered model {mv.name!r} version {mv.version} points to LoggedModel {logged}, which was "
            f"deleted; cannot {doing}: pick another version (`mococxr registry list --name {mv.name}`) or "
            "register another checkpoint (`mococxr registry register`)"
        ) from None


__all__ = [
    "ALIASES",
    "ARCHIVED",
    "PROMOTIONS",
    "canonical_uri",
    "check_alias",
    "model_id",
    "require_logged_model",
    "resolve_path",
    "version_info",
]
