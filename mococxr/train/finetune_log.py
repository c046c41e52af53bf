"""What a fine-tune run records in MLflow beside its epochs: its name and ``mococxr.*`` tags, its
params, config and manifests (each also an MLflow dataset input), and after training the summary
metrics, the per-image test predictions of the chosen epoch and (``keep_model``) the trained model."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.data
import pandas as pd
import torch

from mococxr.config import FinetuneConfig, config_hash, flat_params, to_dict
from mococxr.data.splits import percent
from mococxr.tracking import artifacts as ma
from mococxr.tracking import lineage, registry
from mococxr.tracking import mlflow as mt
from mococxr.train.linear_eval import ProbeGap
from mococxr.train.linear_lr import Choice
from mococxr.train.run_notes import init_label

SHORT_BACKBONES = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "densenet121": "dn121"}
SHORT_PROTOCOLS = {"linear": "lin", "e2e": "e2e"}  # in run names
PREDICTIONS_PARQUET = "predictions/test.parquet"
PREDICTIONS_CSV = "predictions/test.csv"
MANIFEST_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}


def _run_tags(cfg: FinetuneConfig, init_kind: str, origin: dict, manifests: dict) -> dict[str, str]:
    """The run's ``mococxr.*`` tags (with ``init_fallback`` when init auto fell back to random)."""
    return {
        **mt.tags(
            kind="finetune",
            backbone=cfg.backbone,
            init=init_label(init_kind),
            protocol=cfg.protocol,
            dataset=cfg.data.dataset,
            task=cfg.data.task,
            label_fraction=cfg.fraction,
            draw=cfg.draw,
            pretrain_run_id=origin.get("run_id"),
            checkpoint_epoch=origin.get("epoch"),
            registry_version=origin.get("registry_version"),
            manifest_sha256=manifests["train"].sha256,
            test_manifest_sha256=manifests["test"].sha256,
            config_hash=config_hash(cfg),
            preset=cfg.preset,
            image_size=cfg.image_size,
        ),
        **registry.fallback_tags(origin),
    }


def _log_outcome(
    choice: Choice,
    epochs: int,
    test_metrics: dict[str, float],
    predictions: pd.DataFrame,
    gap: ProbeGap | None = None,
    model_id: str | None = None,
) -> None:
    """Summary metrics (the lr choice's and the probe's, for a linear run) and the per-image test
    predictions of the chosen epoch. ``best/at_last_epoch`` (and its tag) flags a best validated epoch
    that is the last one: the validation AUC was still rising, so the budget may be short. With
    ``model_id`` (the kept model) the summary metrics are also that LoggedModel's."""
    # best/* are the summary a user reads in the runs table (the split/name form; no second spelling)
    best_epoch, best_auc, at_last = choice.best_epoch, choice.best_auc, choice.best_epoch == epochs
    if choice.rule:
        mlflow.log_params(choice.params())
        mlflow.set_tag(mt.tag("linear_lr"), f"{choice.lr:g}")
    mlflow.set_tag(mt.tag("best_at_last_epoch"), str(at_last).lower())
    mlflow.log_metrics(
        {
            "best/epoch": best_epoch,
            "best/val_auc": best_auc,
            "best/at_last_epoch": float(at_last),
            **choice.metrics(),
            **test_metrics,
            **(gap.metrics() if gap else {}),
        },
        model_id=model_id,
    )
    ma.log_parquet(predictions, PREDICTIONS_PARQUET)  # what the report reads
    _log_csv(predictions, PREDICTIONS_CSV)  # what the MLflow UI previews as a table


def _run_name(cfg: FinetuneConfig, kind: str, label: str | None = None) -> str:
    """``d0 10% lin moco r18``: what tells a grid's runs apart first (draw, fraction, protocol, init: the
    grid's label of it when given), short. MLflow's runs table cuts a name at its end; a grid's nested rows
    show about 13 characters, which this way still tell draw, fraction, protocol and init apart."""
    backbone = SHORT_BACKBONES.get(cfg.backbone, cfg.backbone)
    protocol = SHORT_PROTOCOLS.get(cfg.protocol, cfg.protocol)
    return f"d{cfg.draw} {percent(cfg.fraction)} {protocol} {label or init_label(kind)} {backbone}"


def keeps_model(cfg: FinetuneConfig) -> bool:
    """Whether ``cfg.keep_model`` keeps this run's trained model."""
    return cfg.keep_model == "all" or cfg.keep_model == cfg.protocol


def _keep_model(
    cfg: FinetuneConfig,
    model: torch.nn.Module,
    choice: Choice,
    tasks: list[str],
    test_metrics: dict[str, float],
    started_from: str = "",
) -> str | None:
    """Log the trained model (encoder, standardising norm and head at the chosen epoch) as a LoggedModel,
    an output of the active run at its best epoch, when ``keep_model`` asks; returns its id."""
    if not keeps_model(cfg):
        return None
    run = mlflow.active_run()
    run_name = run.info.run_name or run.info.run_id
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    auc = f", test AUC {test_metrics['test/auc']:.4f}" if "test/auc" in test_metrics else ""
    page = lineage.link(run_name, lineage.run_page(run.info.experiment_id, run.info.run_id))
    note = (
        f"Trained model of fine-tune run {page}: {cfg.protocol}, {cfg.backbone}, tasks {', '.join(tasks)}, "
        f"at its chosen epoch "
        f"{choice.best_epoch} (validation AUC {choice.best_auc:.4f}{auc}). The state dict holds the encoder "
        "(`encoder.*`), the standardising norm (`norm.*`, empty for e2e and head plain) and the head "
        "(`head.*`); load it with `torch.load(..., weights_only=True)`."
        + (f"\n\n{started_from}" if started_from else "")
    )
    return ma.log_state_dict_model(
        state,
        name=run_name,  # made a valid LoggedModel name by artifacts.checkpoint_name
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        step=choice.best_epoch,
        info={
            "kind": "classifier",
            "backbone": cfg.backbone,
            "protocol": cfg.protocol,
            "head": cfg.head,
            "tasks": tasks,
            "image_size": cfg.image_size,
            "epoch": choice.best_epoch,
            "run_id": run.info.run_id,
        },
        model_tags=mt.tags(kind="finetune", backbone=cfg.backbone, protocol=cfg.protocol, task=cfg.data.task),
        description=note,
        model_type="mococxr-classifier",
    )


def _origin_params(origin: dict) -> dict[str, str]:
    """The checkpoint behind a ``models:/`` init as params, searchable (``params.init_registered_model``)."""
    keys = {
        "registered_model": "init_registered_model",
        "registry_version": "init_registry_version",
        "model_id": "init_model_id",
    }
    return {param: str(origin[key]) for key, param in keys.items() if origin.get(key) is not None}


def _log_manifests(
    manifests: dict, parts: dict[str, pd.DataFrame], cfg: FinetuneConfig, *, phantom: bool, run_id: str
) -> None:
    """Each manifest as a JSON artifact and, with its images' ids and patients, as an MLflow dataset
    input (the UI's Dataset column) whose digest is the manifest's hash."""
    dataset = f"{cfg.data.dataset}{'-phantom' if phantom else ''}"
    names = {
        "train": f"{dataset} train {percent(cfg.fraction)} draw {cfg.draw}",
        "val": f"{dataset} val",
        "test": f"{dataset} test",
    }
    inputs = []
    for name, manifest in manifests.items():
        ma.log_json(manifest.to_dict(), f"manifests/{name}.json", run_id=run_id)
        frame = parts[name][["image_id", "patient_id"]].astype(str).reset_index(drop=True)
        with warnings.catch_warnings():  # a local path can be read as several kinds of source: any will do
            warnings.simplefilter("ignore", UserWarning)
            inputs.append(
                mlflow.data.from_pandas(
                    frame,
                    source=str(Path(cfg.data.root).resolve()),
                    name=names[name],
                    digest=manifest.sha256[:16],
                )
            )
    ma.log_inputs(inputs, contexts=[MANIFEST_CONTEXTS[n] for n in manifests])


def _log_csv(df: pd.DataFrame, artifact_file: str) -> None:
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / path.name, index=False)
        mlflow.log_artifact(str(Path(tmp) / path.name), str(path.parent))


def _log_setup(
    cfg: FinetuneConfig,
    run_id: str,
    params: dict,
    manifests: dict,
    parts: dict[str, pd.DataFrame],
    *,
    phantom: bool,
) -> None:
    """What defines the run, before it trains: its params (``cfg``'s and ``params``), the config and
    the manifests."""
    mlflow.log_params({**flat_params(cfg), **params})
    ma.log_json(to_dict(cfg), "config.json")
    _log_manifests(manifests, parts, cfg, phantom=phantom, run_id=run_id)
