"""Checkpoints by name and stage: the MLflow model registry, with stages implemented as aliases.

Registry stages are deprecated in MLflow 3, so ``staging`` and ``production`` are aliases
(``models:/NAME@production``); the older spelling ``models:/NAME/Production`` is accepted and means
the same alias. ``archived`` removes a version's aliases and marks it with a tag. Every version carries
tags for the run, epoch, metrics and data manifest hash it came from, so ``mococxr registry list``
answers "which checkpoint is production, and where did it come from".

This module also turns any checkpoint reference (``models:/...``, ``runs:/...``, a LoggedModel id
``m-...`` or a local file) into a plain state dict; models/ never talks to MLflow itself.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import TrackingError
from mococxr.models.backbones import (
    available_imagenet_weights,
    imagenet_candidates,
    imagenet_weights_filename,
    load_state_dict_file,
)
from mococxr.tracking.artifacts import MODEL_INFO_FILE, STATE_DICT_FILE
from mococxr.tracking.mlflow import TAG_PREFIX, quote_filter, tag

STAGES = ("staging", "production", "archived")
STAGE_TAG = TAG_PREFIX + "stage"
FINETUNE_RUNS_TAG = TAG_PREFIX + "finetune_runs"  # how many FINISHED fine-tune runs used the version
INIT_FALLBACK_TAG = tag("init_fallback")  # why init auto started a run from random weights
USES_HEADING = "Fine-tune runs that used this version"
_STAGE_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<ref>[^/]+)/?$")
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")


def _stage(value: str) -> str:
    stage = value.lower()
    if stage not in STAGES:
        raise TrackingError(f"unknown stage {value!r}; use one of {', '.join(STAGES)}")
    return stage


def find_logged_model(run_id: str, epoch: int) -> str:
    """The id of the READY LoggedModel that run ``run_id`` logged for ``epoch``."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()}") from exc
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.`{tag('checkpoint_epoch')}` = '{epoch}'",
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
        TAG_PREFIX + "run_id": run_id,
        TAG_PREFIX + "model_id": model_id,
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
        client.update_registered_model(name, description=(
            "MoCo v2 pretrained chest X-ray encoders (mococxr). Each version is one pretraining run's "
            "checkpoint at one epoch; the aliases `staging` and `production` mark the chosen ones. "
            f"Use one with `mococxr finetune --init models:/{name}@production`."))
    metrics = ", ".join(f"{k.removeprefix('metric.')} {v}" for k, v in tags.items() if k.startswith("metric."))
    text = (f"Checkpoint of pretraining run {run_id} at epoch {tags.get(tag('checkpoint_epoch')) or '?'} "
            f"(LoggedModel {tags[TAG_PREFIX + 'model_id']})" + (f"; {metrics}" if metrics else "") + ".")
    client.update_model_version(name, version, description=text)


def promote(name: str, version: str | int, stage: str) -> None:
    """Move ``version`` of ``name`` to ``stage`` (the alias moves off whichever version held it)."""
    stage = _stage(stage)
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise TrackingError(f"registered model {name!r} has no version {version}") from exc
    if stage != "archived":  # archiving a version whose checkpoint is gone is how to retire it
        _require_logged_model(client, mv, "promote it")
    for alias in mv.aliases:
        if alias in STAGES:
            client.delete_registered_model_alias(name, alias)
    if stage != "archived":
        holder = alias_version(name, stage)
        if holder is not None:
            client.set_model_version_tag(name, holder, STAGE_TAG, "none")
        client.set_registered_model_alias(name, stage, str(version))
    client.set_model_version_tag(name, str(version), STAGE_TAG, stage)


def _model_id(mv) -> str | None:
    """The LoggedModel behind a registered version: its tag, MLflow's field, or a ``models:/m-...`` source."""
    source = mv.source or ""
    from_source = source.removeprefix("models:/").strip("/") if source.startswith("models:/m-") else None
    return mv.tags.get(TAG_PREFIX + "model_id") or getattr(mv, "model_id", None) or from_source


def _require_logged_model(client: MlflowClient, mv, doing: str) -> None:
    """Refuse a version whose LoggedModel was deleted: its weights are no longer a checkpoint of the store.

    MLflow keeps the version (and the files) when the LoggedModel is deleted; ``get_logged_model`` then
    answers RESOURCE_DOES_NOT_EXIST, which is what is checked here."""
    model_id = _model_id(mv)
    if not model_id:
        return  # registered from a run's artifacts: no LoggedModel to check
    try:
        client.get_logged_model(model_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(
            f"registered model {mv.name!r} version {mv.version} points to LoggedModel {model_id}, which was "
            f"deleted; cannot {doing}: pick another version (`mococxr registry list --name {mv.name}`) or "
            "register another checkpoint (`mococxr registry register`)"
        ) from None


def alias_version(name: str, alias: str) -> str | None:
    """The version of ``name`` that ``alias`` points to, or None."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _listed_stage(mv, aliases: list[str]) -> str:
    """A version's stage as the registry holds it: its alias (moved in the UI or by any client, the alias
    is the truth); ``archived``, which has no alias, from the tag, and only while no alias points here."""
    aliased = [a for a in aliases if a in STAGES]
    if aliased:
        return "production" if "production" in aliased else aliased[0]
    return "archived" if not aliases and mv.tags.get(STAGE_TAG) == "archived" else ""


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
        filt = f"name = {quote_filter(name)}" if name else None
    except TrackingError:  # both quote kinds in the name: no filter can say it, so filter here
        return [mv for mv in _search_versions(client, None) if mv.name == name]
    found, token = [], None
    while True:
        page = client.search_model_versions(filt, page_token=token)
        found += page
        if not (token := page.token):
            return found


def list_versions(name: str | None = None) -> pd.DataFrame:
    """One row per registered version: name, version, stage, run, epoch and its metrics."""
    client = MlflowClient()
    rows = []
    aliases = _aliases(client, name)
    for mv in _search_versions(client, name):
        stage = _listed_stage(mv, aliases.get((mv.name, str(mv.version)), []))
        metrics = {k.removeprefix("metric."): v for k, v in mv.tags.items() if k.startswith("metric.")}
        rows.append(
            {
                "name": mv.name,
                "version": int(mv.version),
                "stage": stage,
                "run_id": mv.tags.get(TAG_PREFIX + "run_id", mv.run_id or ""),
                "epoch": mv.tags.get(tag("checkpoint_epoch"), ""),
                **metrics,
            }
        )
    if name and not rows:
        raise TrackingError(f"no registered model named {name!r} in {mlflow.get_tracking_uri()}")
    cols = ["name", "version", "stage", "run_id", "epoch"]
    df = pd.DataFrame(rows)
    return df.sort_values(["name", "version"]).reset_index(drop=True) if len(df) else pd.DataFrame(columns=cols)


def canonical_uri(uri: str) -> str:
    """Translate ``models:/NAME/Production`` (stage spelling) to ``models:/NAME@production``."""
    m = _STAGE_URI.match(uri)
    if m and not m.group("ref").isdigit() and not uri.startswith("models:/m-"):
        return f"models:/{m.group('name')}@{_stage(m.group('ref'))}"
    return uri


def resolve(ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any checkpoint reference -> (state dict, info).

    ``ref`` is ``models:/NAME@stage``, ``models:/NAME/Stage``, ``models:/NAME/3``, ``models:/m-<id>``,
    ``runs:/<run_id>/<path to a .pt file or a folder holding state_dict.pt>``, or a local file.
    ``info`` holds what is known of its origin (run id, epoch, registry version, backbone).
    """
    info: dict[str, Any] = {"uri": ref}
    if ref.startswith(("models:/", "runs:/")):
        uri = canonical_uri(ref)
        info.update(version_info(uri))
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri))
        except MlflowException as exc:
            raise TrackingError(f"cannot resolve {ref!r} in {mlflow.get_tracking_uri()}: {exc.message}") from exc
    else:
        local = Path(ref)  # a missing file is the loader's DataError, like any other unreadable file
    if local.is_dir():
        if (local / MODEL_INFO_FILE).is_file():
            info.update(json.loads((local / MODEL_INFO_FILE).read_text()))
        local = local / STATE_DICT_FILE
        if not local.is_file():
            raise TrackingError(f"{ref!r} holds no {STATE_DICT_FILE}; is it a mococxr checkpoint?")
    state = load_state_dict_file(local, what=f"checkpoint {ref!r}")
    return state, info


def resolve_init(init: str, backbone: str) -> tuple[str, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(init kind, state dict or None, origin info) for a config's ``init``, ready for ``build_encoder``.

    ``auto`` picks imagenet when its weights file is present, else random: never silently, the fallback
    is one line on stderr (once per process and backbone) and ``origin["init_fallback"]`` holds the
    reason, which :func:`fallback_tags` turns into the run's ``mococxr.init_fallback`` tag. Anything
    other than ``random``/``imagenet`` is a checkpoint reference resolved by :func:`resolve` (kind
    ``checkpoint``).
    """
    origin: dict[str, Any] = {}
    if init == "auto":
        init = "imagenet" if available_imagenet_weights(backbone) is not None else "random"
        if init == "random":
            origin["init_fallback"] = _say_fallback(backbone)
    if init in ("random", "imagenet"):
        return init, None, origin
    state, info = resolve(init)
    return "checkpoint", state, info


_FALLBACKS_SAID: set[str] = set()  # backbones whose init auto fallback this process has announced


def _say_fallback(backbone: str) -> str:
    """The reason init auto fell back to random; printed on stderr the first time per backbone."""
    looked = " or ".join(str(p) for p in imagenet_candidates(backbone))
    reason = f"init auto: no ImageNet weights for {backbone} at {looked}; started from random init"
    if backbone not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(backbone)
        print(f"mococxr: {reason} (put torchvision's {imagenet_weights_filename(backbone)} there, or pass "
              "--init random to silence this)", file=sys.stderr, flush=True)
    return reason


def fallback_tags(origin: dict[str, Any]) -> dict[str, str]:
    """``{"mococxr.init_fallback": reason}`` when :func:`resolve_init` fell back to random, else ``{}``."""
    return {INIT_FALLBACK_TAG: origin["init_fallback"]} if origin.get("init_fallback") else {}


def version_info(uri: str) -> dict[str, Any]:
    """Registry version, run id and epoch behind a models:/ or runs:/ URI (as canonical_uri spells it)."""
    client = MlflowClient()
    mv = None
    try:
        if m := _ALIAS_URI.match(uri):
            mv = client.get_model_version_by_alias(m.group("name"), m.group("alias"))
        elif (m := _STAGE_URI.match(uri)) and m.group("ref").isdigit():
            mv = client.get_model_version(m.group("name"), m.group("ref"))
    except MlflowException as exc:
        raise TrackingError(f"cannot resolve {uri!r} in {mlflow.get_tracking_uri()}: {exc.message}") from exc
    if mv is None:
        if uri.startswith("models:/m-"):
            try:
                model = client.get_logged_model(uri.removeprefix("models:/").strip("/"))
            except MlflowException as exc:  # unknown, or deleted
                raise TrackingError(f"cannot resolve {uri!r} in {mlflow.get_tracking_uri()}: {exc.message}") from exc
            return {"run_id": model.source_run_id, "epoch": _epoch(model.tags.get(tag("checkpoint_epoch"))),
                    "model_id": model.model_id}
        if uri.startswith("runs:/"):
            return {"run_id": uri.removeprefix("runs:/").split("/", 1)[0]}
        return {}
    _require_logged_model(client, mv, f"use {uri}")
    return {
        "registered_model": mv.name,
        "registry_version": str(mv.version),
        "run_id": mv.tags.get(TAG_PREFIX + "run_id", mv.run_id),
        "epoch": _epoch(mv.tags.get(tag("checkpoint_epoch"))),
        "model_id": _model_id(mv),
    }


def _epoch(value: str | None) -> int | None:
    """Epoch tags are strings; ``info["epoch"]`` is an int whichever source filled it."""
    return int(value) if value not in (None, "") else None


# --------------------------------------------------------------------------- who used a version


def log_model_input(run_id: str, origin: dict[str, Any]) -> None:
    """Log the checkpoint behind ``origin`` as the run's input model: the run page links to it.

    Done through the client, not ``mlflow.log_inputs``, whose ``models=`` is refused outside Databricks
    although the sqlite store and the tracking server both store model inputs.
    """
    if origin.get("model_id"):
        MlflowClient().log_inputs(run_id, models=[LoggedModelInput(origin["model_id"])])


def consumers_filter(name: str, version: str | int) -> str:
    """The MLflow search filter that finds the finished fine-tune runs initialised from ``name`` ``version``."""
    return (f"tags.`{tag('kind')}` = 'finetune' and tags.`{tag('registry_version')}` = {quote_filter(version)} and "
            f"params.init_registered_model = {quote_filter(name)} and attributes.status = 'FINISHED'")


def count_consumers(name: str, version: str | int) -> int:
    """How many FINISHED fine-tune runs, in any active experiment, were initialised from the version."""
    client = MlflowClient()
    exp_ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        exp_ids += [e.experiment_id for e in page]
        if not (token := page.token):
            break
    count, filt = 0, consumers_filter(name, version)
    for i in range(0, len(exp_ids), 100):
        token = None
        while True:
            page = client.search_runs(exp_ids[i:i + 100], filt, max_results=1000, page_token=token)
            count += len(page)
            if not (token := page.token):
                break
    return count


def record_finetune_use(name: str, version: str | int) -> int | None:
    """Tag the version with its fine-tune run count and say in its description how to find the runs.

    The count is recounted by search, never incremented, so two runs finishing together both write a
    true count (and re-check once: whoever writes last wrote what the store then held). The registry
    is bookkeeping here: a failure warns and returns None, and the fine-tune run stays as logged.
    """
    client = MlflowClient()
    try:
        count = None
        for _ in range(2):
            fresh = count_consumers(name, version)
            if fresh == count:
                break
            count = fresh
            client.set_model_version_tag(name, str(version), FINETUNE_RUNS_TAG, str(count))
        mv = client.get_model_version(name, str(version))
        if USES_HEADING not in (mv.description or ""):
            text = (f"{USES_HEADING} (count in tag `{FINETUNE_RUNS_TAG}`): in their experiment's run list, "
                    f"search `{consumers_filter(name, version)}`. Each such run also shows this checkpoint "
                    "under its logged models (inputs).")
            client.update_model_version(name, str(version), description=f"{mv.description or ''}\n\n{text}".strip())
        return count
    except (MlflowException, TrackingError) as exc:
        warnings.warn(f"could not record the fine-tune use of {name} version {version}: {exc}", stacklevel=2)
        return None
