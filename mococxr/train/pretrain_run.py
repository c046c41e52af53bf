"""A pretraining run in MLflow: opening it (tags, params, config, manifest, dataset input, the run's
description) or reopening it for a resume and repairing what a crash left behind, and the precision it
trains in as params."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import mlflow
import pandas as pd

from mococxr.config import PretrainConfig, config_hash, flat_params, to_dict
from mococxr.data.prepare import Prepared
from mococxr.data.splits import Manifest
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.train import checkpoints
from mococxr.train.inits import INIT_FALLBACK_TAG, fallback_tags
from mococxr.train.pretrain_state import PretrainResult, Training


def _start_run(
    run_scope: contextlib.ExitStack,
    t: Training,
    data: Prepared,
    parent_run_id: str | None,
    extra_tags: dict[str, str] | None,
) -> str:
    """Rank 0: start a new MLflow run inside ``run_scope`` and log what defines it; returns its id."""
    cfg, manifest = t.cfg, data.manifests["pretrain"]
    run_tags = mt.tags(
        kind="pretrain",
        backbone=cfg.backbone,
        init=t.init,
        dataset=cfg.data.dataset,
        manifest_sha256=manifest.sha256,
        config_hash=config_hash(cfg),
        preset=cfg.preset,
        image_size=cfg.image_size,
        pretrain_run_id=t.origin.get("run_id"),
    )
    run_tags = {**run_tags, **fallback_tags(t.origin), **(extra_tags or {})}
    run_tags[mt.NOTE_TAG] = describe(cfg, t.init, len(manifest.image_ids), run_tags)
    run = run_scope.enter_context(
        mt.start_run(
            cfg.experiment,
            run_name=cfg.run_name,
            run_tags=run_tags,
            parent_run_id=parent_run_id,
        )
    )
    t.label = run_label(cfg, run.info.run_id)
    mlflow.log_params({**flat_params(cfg), "init_resolved": t.init, "world_size": t.world})
    _log_precision(t, {})
    ma.log_json(to_dict(cfg), "config.json")
    ma.log_json(manifest.to_dict(), "manifests/pretrain.json")
    _log_dataset(cfg, data.pretrain, manifest)
    return run.info.run_id


def _log_precision(t: Training, logged: dict[str, str]) -> None:
    """Rank 0: the precision in effect as params (``amp_effective``, ``channels_last_effective``), and on
    stderr why a requested switch is not in effect. ``logged``: the params a reopened run already has; a
    resume that runs under another precision (on another device) adds ``<param>_from_epoch_<N>``."""
    if t.precision.reason:
        checkpoints.say(t.precision.reason)
    new = {}
    for key, value in t.precision.params().items():
        began = logged.get(key, value)
        if began != value:
            checkpoints.say(
                f"this resume trains from epoch {t.start_epoch} with {key}={value}; the run began "
                f"with {began}"
            )
            key = f"{key}_from_epoch_{t.start_epoch}"
        if logged.get(key, value) == value:  # params are immutable: a value logged once stays
            new[key] = value
    mlflow.log_params(new)


def run_label(cfg: PretrainConfig, run_id: str) -> str:
    """What names a run in checkpoint names and progress lines: its run name (a sweep trial's is
    ``<study>-trialNNN``), else backbone and run id."""
    return cfg.run_name or f"{cfg.backbone}-{run_id[:8]}"


def describe(cfg: PretrainConfig, init: str, n_images: int, run_tags: dict[str, str]) -> str:
    """The run's description: what was trained on what, how, and for which study trial."""
    origin = f"from {cfg.init}" if init == "checkpoint" else f"{init} init"
    if INIT_FALLBACK_TAG in run_tags:
        origin += f"; {run_tags[INIT_FALLBACK_TAG]}"
    text = (
        f"MoCo v2 pretraining of {cfg.backbone} ({origin}) on {cfg.data.dataset}/{cfg.data.task}: "
        f"{cfg.epochs} epochs over {n_images} images at {cfg.image_size} px, batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr:g} with a {cfg.scheduler} schedule, queue K={cfg.moco_k}, "
        f"m={cfg.moco_m:g}, T={cfg.moco_t:g}. Each epoch's encoder is a logged model."
    )
    if cfg.monitor:
        text += (
            " A linear evaluation on the validation split scores every epoch (val/linear_auc); "
            "best/val_linear_auc and best/epoch name the best epoch so far."
        )
    study, trial = run_tags.get(mt.tag("optuna_study")), run_tags.get(mt.tag("optuna_trial"))
    if study is not None:
        text += f" Trial {trial} of the Optuna study {study!r}; the study's parent run compares its trials."
    return text


def _log_dataset(cfg: PretrainConfig, records: pd.DataFrame, manifest: Manifest) -> None:
    """The pretraining images as the run's dataset input (the UI's Dataset column)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.pandas_dataset import from_pandas

    # a source built from its JSON: resolving a bare path warns that two registered classes match it
    source = get_dataset_source_from_json(json.dumps({"uri": cfg.data.root}), "local")
    frame = records[["image_id", "patient_id"]].reset_index(drop=True)
    # MLflow stores at most 36 characters of a digest; the full hash is the manifest_sha256 tag
    dataset = from_pandas(frame, source=source, name="pretrain", digest=manifest.sha256[:32])
    ma.log_inputs([dataset], contexts=["pretrain"])


def _reopen_run(
    run_scope: contextlib.ExitStack,
    t: Training,
    run_id: str,
    state: dict[str, Any] | None,
    result: PretrainResult,
) -> str:
    """Rank 0: reopen run ``run_id`` inside ``run_scope`` and repair what a crash left behind."""
    # the budget first (the run's config.json is what the next --resume reads); it is also the resume's
    # first write, so a read-only or full artifact store stops it here, before the run is touched
    checkpoints.record_budget(run_id, to_dict(t.cfg))
    run = run_scope.enter_context(mt.start_run(t.cfg.experiment, run_id=run_id))
    t.label = run_label(t.cfg, run_id)
    if t.cfg.epochs != int(
        run.data.params.get("epochs", t.cfg.epochs)
    ):  # extended: say so in the description
        mlflow.set_tag(
            mt.NOTE_TAG,
            describe(t.cfg, t.init, len(t.dataset), run.data.tags)
            + f" Extended by a resume from the {run.data.params['epochs']} epochs of its params to "
            f"{t.cfg.epochs} (config.json holds the current budget).",
        )
    last = int(state["epoch"]) if state else 0
    _log_precision(t, run.data.params)
    checkpoints.reconcile(run_id, last, state.get("metrics") if state else None)
    result.history = {int(k): v for k, v in json.loads(state["history"]).items()} if state else {}
    if last >= t.cfg.epochs:
        checkpoints.say(
            f"run {run_id} already has epoch {last} of its {t.cfg.epochs}; nothing to train (to train "
            f"longer: mococxr pretrain --resume {run_id} --epochs N, with N > {last})"
        )
    return run.info.run_id
