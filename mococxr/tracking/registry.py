"""Checkpoints by name and alias: the MLflow model registry's versions, aliases and promotion.

Registry stages are deprecated in MLflow 3, so ``staging`` and ``production`` are aliases
(``models:/NAME@production``); the older spelling ``models:/NAME/Production`` is accepted and means
the same alias. ``archived`` removes a version's aliases and marks it with a tag. Every version carries
tags for the run, epoch, metrics and data manifest hash it came from, so ``mococxr registry list``
answers "which checkpoint is production, and where did it come from". Promotion lives here alone:
:func:`promote` moves an alias, :func:`promote_best` registers a study's best checkpoint and moves one.

Turning a reference (``models:/...``, ``runs:/...``, a LoggedModel id or a local file) into a local
file is :mod:`mococxr.tracking.uris`; loading it and building a model is the caller's
(:mod:`mococxr.train.inits`): tracking knows nothing of models.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import TrackingError
from mococxr.tracking import filters as flt
from mococxr.tracking import lineage
from mococxr.tracking.mlflow import tag, tags
from mococxr.tracking.uris import (  # re-exported: the registry's view of a reference
    ALIASES,
    ARCHIVED,
    PROMOTIONS,
    canonical_uri,
    check_alias,
    require_logged_model,
    resolve_path,
    version_info,
)

# A version's alias as a tag too, so ``archived`` (which has no alias) is listed; the key keeps the
# name stores already hold.
ALIAS_TAG = tag("stage")
FINETUNE_RUNS_TAG = tag("finetune_runs")  # how many FINISHED fine-tune runs used the version
INIT_FALLBACK_TAG = tag("init_fallback")  # why init auto started a run from random weights
USES_HEADING = "Fine-tune runs that used this version"  # heads the list in a version's description


def find_logged_model(run_id: str, epoch: int) -> str:
    """The id of the READY LoggedModel that run ``run_id`` logged for ``epoch``."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()}") from exc
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=flt.both(flt.equal("source_run_id", run_id), flt.tag(tag("checkpoint_epoch"), epoch)),
    )
    ready = [m for m in models if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    if not ready:
        raise TrackingError(f"run {run_id} has no checkpoint for epoch {epoch} (was it pruned by retention?)")
    return ready[0].model_id


def register(
    name: str,
    *,
    model_id: str | None = None,
    run_id: str | None = None,
    epoch: int | None = None,
    extra_tags: dict[str, Any] | None = None,
) -> str:
    """Register a checkpoint (a LoggedModel, or a run's epoch) as a new version of ``name``.

    The version is tagged with the source run, epoch, the epoch's metrics and the data manifest hash.
    Returns the version number as a string.
    """
    client = MlflowClient()
    if model_id is None:
        if run_id is None or epoch is None:
            raise TrackingError("register needs a model id, or a run id and an epoch")
        model_id = find_logged_model(run_id, epoch)
    try:
        model = client.get_logged_model(model_id)
    except MlflowException as exc:
        raise TrackingError(f"no LoggedModel {model_id!r} in {mlflow.get_tracking_uri()}") from exc
    run_id = model.source_run_id
    version_tags = {
        tag("run_id"): run_id,
        tag("model_id"): model_id,
        tag("checkpoint_epoch"): model.tags.get(tag("checkpoint_epoch"), ""),
    }
    run_tags = client.get_run(run_id).data.tags if run_id else {}
    for key in ("manifest_sha256", "backbone", "dataset"):
        if tag(key) in run_tags:
            version_tags[tag(key)] = run_tags[tag(key)]
    for metric in model.metrics or []:
        version_tags[f"metric.{metric.key}"] = f"{metric.value:.6g}"
    version_tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    mv = mlflow.register_model(f"models:/{model_id}", name, tags=version_tags)
    _describe_version(client, name, str(mv.version), run_id, version_tags)
    return str(mv.version)


def _describe_version(client: MlflowClient, name: str, version: str, run_id: str | None, tags: dict) -> None:
    """Descriptions for the MLflow UI: the model's (when it has none) and the new version's origin."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            description=(
                "MoCo v2 pretrained chest X-ray encoders (mococxr). Each version is one pretraining run's "
                "checkpoint at one epoch; the aliases `staging` and `production` mark the chosen ones. "
                f"Use one with `mococxr finetune --init models:/{name}@production`."
            ),
        )
    metrics = ", ".join(
        f"{k.removeprefix('metric.')} {v}" for k, v in tags.items() if k.startswith("metric.")
    )
    text = (
        f"Checkpoint of pretraining run {run_id} at epoch {tags.get(tag('checkpoint_epoch')) or '?'} "
        f"(LoggedModel {tags[tag('model_id')]})" + (f"; {metrics}" if metrics else "") + "."
    )
    client.update_model_version(name, version, description=text)


def promote(name: str, version: str | int, alias: str) -> None:
    """Move ``alias`` of ``name`` to ``version`` (off whichever version held it); ``archived`` removes
    the version's aliases instead."""
    alias = check_alias(alias)
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise TrackingError(f"registered model {name!r} has no version {version}") from exc
    if alias != ARCHIVED:  # archiving a version whose checkpoint is gone is how to retire it
        require_logged_model(client, mv, "promote it")
    for held in mv.aliases:
        if held in PROMOTIONS:
            client.delete_registered_model_alias(name, held)
    if alias != ARCHIVED:
        holder = alias_version(name, alias)
        if holder is not None:
            client.set_model_version_tag(name, holder, ALIAS_TAG, "none")
        client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), ALIAS_TAG, alias)


def promote_best(name: str, run_id: str, epoch: int, alias: str, *, study_name: str, trial: int) -> str:
    """Register ``run_id``'s ``epoch`` checkpoint and move ``alias`` to it; the version ``alias`` already
    points to is reused when it is that checkpoint."""
    client = MlflowClient()
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if (
        holder is not None
        and holder.tags.get(tag("run_id")) == run_id
        and holder.tags.get(tag("checkpoint_epoch")) == str(epoch)
    ):
        return str(holder.version)  # another worker of this study promoted it already
    version = register(
        name, run_id=run_id, epoch=epoch, extra_tags=tags(optuna_study=study_name, optuna_trial=trial)
    )
    promote(name, version, alias)
    return version


def alias_version(name: str, alias: str) -> str | None:
    """The version of ``name`` that ``alias`` points to, or None."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _listed_alias(mv, aliases: list[str]) -> str:
    """A version's alias as the registry holds it (moved in the UI or by any client, the alias is the
    truth); ``archived``, which has no alias, from the tag, and only while no alias points here."""
    aliased = [a for a in aliases if a in PROMOTIONS]
    if aliased:
        return "production" if "production" in aliased else aliased[0]
    return ARCHIVED if not aliases and mv.tags.get(ALIAS_TAG) == ARCHIVED else ""


def _aliases(client: MlflowClient, name: str | None) -> dict[tuple[str, str], list[str]]:
    """``(model name, version) -> aliases`` from the registered models: MLflow's version search leaves a
    version's ``aliases`` empty, only the registered model (or one version fetched by number) holds them."""
    if name:
        try:
            models = [client.get_registered_model(name)]
        except MlflowException:
            return {}
    else:
        models, token = [], None
        while True:
            page = client.search_registered_models(page_token=token)
            models += page
            if not (token := page.token):
                break
    found: dict[tuple[str, str], list[str]] = {}
    for model in models:
        for alias, version in (model.aliases or {}).items():
            found.setdefault((model.name, str(version)), []).append(alias)
    return found


def _search_versions(client: MlflowClient, name: str | None) -> list:
    """Every version (of ``name``), through all result pages."""
    try:
        filt = flt.equal("name", name) if name else None
    except TrackingError:  # both quote kinds in the name: no filter can say it, so filter here
        return [mv for mv in _search_versions(client, None) if mv.name == name]
    found, token = [], None
    while True:
        page = client.search_model_versions(filt, page_token=token)
        found += page
        if not (token := page.token):
            return found


def list_versions(name: str | None = None) -> pd.DataFrame:
    """One row per registered version: name, version, alias (column ``stage``, as the CLI lists it), run,
    epoch and its metrics."""
    client = MlflowClient()
    rows = []
    aliases = _aliases(client, name)
    for mv in _search_versions(client, name):
        alias = _listed_alias(mv, aliases.get((mv.name, str(mv.version)), []))
        metrics = {k.removeprefix("metric."): v for k, v in mv.tags.items() if k.startswith("metric.")}
        rows.append(
            {
                "name": mv.name,
                "version": int(mv.version),
                "stage": alias,
                "run_id": mv.tags.get(tag("run_id"), mv.run_id or ""),
                "epoch": mv.tags.get(tag("checkpoint_epoch"), ""),
                **metrics,
            }
        )
    if name and not rows:
        raise TrackingError(f"no registered model named {name!r} in {mlflow.get_tracking_uri()}")
    cols = ["name", "version", "stage", "run_id", "epoch"]
    df = pd.DataFrame(rows)
    return (
        df.sort_values(["name", "version"]).reset_index(drop=True) if len(df) else pd.DataFrame(columns=cols)
    )


# --------------------------------------------------------------------------- init auto's fallback tag


def fallback_tags(origin: dict[str, Any]) -> dict[str, str]:
    """``{"mococxr.init_fallback": reason}`` when ``resolve_init`` fell back to random, else ``{}``."""
    return {INIT_FALLBACK_TAG: origin["init_fallback"]} if origin.get("init_fallback") else {}


# --------------------------------------------------------------------------- who used a version


def consumers_filter(name: str, version: str | int) -> str:
    """The MLflow search filter that finds the finished fine-tune runs initialised from ``name``
    ``version``."""
    return flt.both(
        flt.tag(tag("kind"), "finetune"),
        flt.tag(tag("registry_version"), version),
        flt.equal("params.init_registered_model", name),
        flt.status("FINISHED"),
    )


def count_consumers(name: str, version: str | int) -> int:
    """How many FINISHED fine-tune runs, in any active experiment, were initialised from the version."""
    return len(lineage.find_runs(consumers_filter(name, version))[0])


def record_finetune_use(name: str, version: str | int) -> int | None:
    """Tag the version with its fine-tune run count and list the runs, as links, in its description.

    Count and list are rewritten whole from a search, never incremented, and settled (see
    :func:`mococxr.tracking.lineage.settle`): two runs finishing together both end up counted and listed.
    The text before the list (the version's origin, or what a user wrote) is kept. The registry is
    bookkeeping here: a failure warns and returns None, and the fine-tune run stays as logged.
    """
    client = MlflowClient()

    def write(found: lineage.Found) -> None:
        client.set_model_version_tag(name, str(version), FINETUNE_RUNS_TAG, str(len(found[0])))
        text = client.get_model_version(name, str(version)).description or ""
        head = lineage.before_section(text, USES_HEADING)
        room = lineage.VERSION_NOTE_LIMIT - len(head) - 2
        section = lineage.runs_section(USES_HEADING, found, filt, room)
        client.update_model_version(
            name, str(version), description=lineage.with_section(text, USES_HEADING, section)
        )

    try:
        filt = consumers_filter(name, version)
        return len(lineage.settle(lambda: lineage.find_runs(filt), write)[0])
    except (MlflowException, TrackingError) as exc:
        warnings.warn(f"could not record the fine-tune use of {name} version {version}: {exc}", stacklevel=2)
        return None


__all__ = [
    "ALIASES",
    "ALIAS_TAG",
    "ARCHIVED",
    "FINETUNE_RUNS_TAG",
    "INIT_FALLBACK_TAG",
    "PROMOTIONS",
    "USES_HEADING",
    "alias_version",
    "canonical_uri",
    "consumers_filter",
    "count_consumers",
    "fallback_tags",
    "find_logged_model",
    "list_versions",
    "promote",
    "promote_best",
    "record_finetune_use",
    "register",
    "resolve_path",
    "version_info",
]
