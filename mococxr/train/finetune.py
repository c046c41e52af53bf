"""Fine-tuning at a label fraction: ``linear`` (frozen backbone in eval mode, new head) or ``e2e``.

One call is one MLflow run: parameters and ``mococxr.*`` tags, per-epoch train and validation metrics,
the split and draw manifests, and after training the test AUC/AUPRC per task and the per-image test
predictions (``predictions/test.parquet``) from which the report module builds its tables. A run started
from a checkpoint links to it (description and input models) and is listed under it once it finished
(``tracking/lineage.py``); ``keep_model`` keeps the trained model as the run's output.

The best epoch is chosen by validation AUC alone (and, with ``linear_lr: select``, the linear head's
learning rate: ``train/linear_lr.py``); the test split is read once, after training, with the weights of
that epoch. Nothing computed on the test set can change what was trained or chosen. A run whose best
validated epoch is its last is flagged (``best/at_last_epoch``, tag ``mococxr.best_at_last_epoch``).

The pieces: the model (``head.py``), what it reads (``finetune_inputs.py``), the training loop
(``finetune_loop.py``), what is measured (``finetune_metrics.py``) and what the run records in MLflow
(``finetune_log.py``); this module draws the data, builds the model and runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import pandas as pd
import torch

from mococxr.config import FinetuneConfig
from mococxr.data.labels import label_matrix
from mococxr.data.phantom import is_phantom
from mococxr.data.prepare import Prepared, open_cache, prepare
from mococxr.data.splits import draw_fraction, make_manifest
from mococxr.errors import DataError
from mococxr.models.backbones import build_encoder
from mococxr.tracking import lineage, registry
from mococxr.tracking import mlflow as mt
from mococxr.train.budget import training_budget
from mococxr.train.finetune_inputs import (
    Inputs,
    feature_loader,
    model_inputs,
    predict,
    predict_features,
    train_loader,
)
from mococxr.train.finetune_log import (
    MANIFEST_CONTEXTS,
    PREDICTIONS_CSV,
    PREDICTIONS_PARQUET,
    _keep_model,
    _log_outcome,
    _log_setup,
    _origin_params,
    _run_name,
    _run_tags,
)
from mococxr.train.finetune_loop import _fit
from mococxr.train.finetune_metrics import prediction_table, task_metrics
from mococxr.train.head import Classifier, masked_bce
from mococxr.train.inits import resolve_init
from mococxr.train.linear_eval import ProbeGap, probe_gap
from mococxr.train.linear_lr import Choice, train_arm
from mococxr.train.precision import Precision
from mococxr.train.precision import resolve as resolve_precision
from mococxr.train.run_notes import describe_run, result_line

__all__ = [
    "MANIFEST_CONTEXTS",
    "PREDICTIONS_CSV",
    "PREDICTIONS_PARQUET",
    "Classifier",
    "FinetuneResult",
    "Inputs",
    "build_encoder",
    "feature_loader",
    "finetune",
    "masked_bce",
    "model_inputs",
    "predict",
    "predict_features",
    "prediction_table",
    "task_metrics",
    "train_loader",
    "training_budget",
]


@dataclass
class FinetuneResult:
    run_id: str
    best_epoch: int
    val_auc: float
    test: dict[str, float]
    predictions: pd.DataFrame
    lr_chosen: float | None = None  # linear_lr select: the learning rate validation chose


def _draw(cfg: FinetuneConfig, data: Prepared):
    """This run's label-fraction draw of the train split, the shared val and test splits, and manifests."""
    train = draw_fraction(
        data.splits["train"], cfg.fraction, draw=cfg.draw, seed=cfg.seed, task=data.tasks[0]
    )
    val, test = data.splits["val"], data.splits["test"]
    for name, part in (("val", val), ("test", test)):
        if len(part) == 0:
            raise DataError(f"the {name} split is empty; check --val/--test fractions or --test-csv")
    manifests = {
        "train": make_manifest("train", train, seed=cfg.seed, fraction=cfg.fraction, draw=cfg.draw),
        "val": data.manifests["val"],
        "test": data.manifests["test"],
    }
    return train, val, test, manifests


def finetune(
    cfg: FinetuneConfig,
    *,
    data: Prepared | None = None,
    store: mt.Store | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train per ``cfg`` on its label-fraction draw, keep the best epoch by val AUC, score the test set.

    ``data`` (prepared from ``cfg.data`` when not given) is shared by every run of a grid, so they all
    draw from one split and score one test set. A linear run also fits the fast logistic probe on the
    same draw and logs how far its head is below it (``val/probe_gap``).
    """
    mt.current_store(store)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = prepare(cfg.data) if data is None else data
    tasks = list(data.tasks)
    train, val, test, manifests = _draw(cfg, data)
    model, precision, init_kind, origin = _build_model(cfg, len(tasks), device)
    cache = open_cache(cfg.data, pd.concat([train, val, test], ignore_index=True), cfg.image_size)
    inputs = model_inputs(cfg, model, train, tasks, cache, device, precision)
    budget = training_budget(cfg, len(inputs.train), len(train))

    phantom = is_phantom(cfg.data.root)
    sizes = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
    note, started_from = _describe(cfg, init_kind, origin, budget, phantom, sizes)
    run_tags = {**_run_tags(cfg, init_kind, origin, manifests), mt.NOTE_TAG: note, **(extra_tags or {})}
    run_name = cfg.run_name or _run_name(cfg, init_kind, (extra_tags or {}).get(mt.tag("init")))
    with mt.start_run(
        cfg.experiment, run_name=run_name, run_tags=run_tags, parent_run_id=parent_run_id
    ) as run:
        run_id = run.info.run_id
        params = {**budget.params(), **precision.params(), "init_resolved": init_kind, "phantom": phantom}
        parts = {"train": train, "val": val, "test": test}
        _log_setup(
            cfg, run_id, {**params, **_origin_params(origin), **sizes}, manifests, parts, phantom=phantom
        )
        lineage.log_checkpoint_input(run_id, origin)
        choice, gap = _train_and_probe(
            cfg,
            model,
            inputs,
            train,
            val,
            tasks,
            cache,
            device=device,
            epochs=budget.epochs,
            progress=progress,
            precision=precision,
        )
        test_metrics, predictions = _score_and_log(
            cfg, model, inputs, test, tasks, choice, gap, budget.epochs, note, started_from
        )
    _record_use(origin)  # after FINISHED: the searches that rewrite the lists of runs find this one
    lr_chosen = choice.lr if choice.rule == "select" else None
    return FinetuneResult(run_id, choice.best_epoch, choice.best_auc, test_metrics, predictions, lr_chosen)


def _describe(
    cfg: FinetuneConfig, init_kind: str, origin: dict, budget, phantom: bool, sizes: dict[str, int]
) -> tuple[str, str]:
    """The run's description, and its sentence of links to where its checkpoint came from."""
    started_from = lineage.origin_links(origin)
    note = describe_run(
        cfg, init_kind, origin, budget=budget, phantom=phantom, sizes=sizes, started_from=started_from
    )
    return note, started_from


def _record_use(origin: dict) -> None:
    """List the finished run under its checkpoint and registered version (rewritten from a search)."""
    if origin.get("model_id"):
        lineage.record_use(origin["model_id"])
    if origin.get("registry_version"):
        registry.record_finetune_use(origin["registered_model"], origin["registry_version"])


def _build_model(
    cfg: FinetuneConfig, n_tasks: int, device: torch.device
) -> tuple[Classifier, Precision, str, dict]:
    """The encoder ``cfg.init`` names under a new linear head, on ``device`` in ``cfg``'s precision; also
    that precision, the resolved init kind and where a checkpoint init came from."""
    torch.manual_seed(cfg.seed * 1_000_003 + cfg.draw)
    init_kind, state, origin = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=init_kind, state_dict=state)
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)
    model = precision.model(
        Classifier(encoder, n_tasks, frozen=cfg.protocol == "linear", standardize=cfg.head == "standardized"),
        device,
    )
    return model, precision, init_kind, origin


def _train_and_probe(
    cfg: FinetuneConfig,
    model: Classifier,
    inputs: Inputs,
    train: pd.DataFrame,
    val: pd.DataFrame,
    tasks: list[str],
    cache,
    *,
    device: torch.device,
    epochs: int,
    progress: bool,
    precision: Precision,
) -> tuple[Choice, ProbeGap | None]:
    """Train (one learning rate, or each candidate of ``linear_lr: select``) and keep the best epoch; a
    linear run then fits the fast logistic probe on the same draw."""
    choice = train_arm(
        _fit,
        model,
        cfg,
        inputs,
        val,
        tasks,
        device=device,
        epochs=epochs,
        progress=progress,
        precision=precision,
    )
    # a linear run's probe comes after training: its loaders never draw from the training RNG
    gap = (
        probe_gap(
            model.encoder,
            train,
            val,
            tasks,
            choice.best_auc,
            image_size=cfg.image_size,
            cache=cache,
            workers=cfg.workers,
            device=device,
            features=inputs.features.features if inputs.features else None,
        )
        if cfg.protocol == "linear"
        else None
    )
    return choice, gap


def _score_and_log(
    cfg: FinetuneConfig,
    model: Classifier,
    inputs: Inputs,
    test: pd.DataFrame,
    tasks: list[str],
    choice: Choice,
    gap: ProbeGap | None,
    epochs: int,
    note: str,
    started_from: str,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Score the test set once, keep the trained model (``keep_model``), log the outcome (summary metrics,
    also the kept model's; predictions) and complete the run's description with it."""
    test_metrics, predictions = _score_test(inputs, test, tasks)
    model_id = _keep_model(cfg, model, choice, tasks, test_metrics, started_from)
    _log_outcome(choice, epochs, test_metrics, predictions, gap, model_id)
    mlflow.set_tag(
        mt.NOTE_TAG,
        note + choice.describe() + result_line(choice.best_epoch, epochs, choice.best_auc, test_metrics, gap),
    )
    return test_metrics, predictions


def _score_test(
    inputs: Inputs, test: pd.DataFrame, tasks: list[str]
) -> tuple[dict[str, float], pd.DataFrame]:
    """The test set, read once with the chosen epoch's weights: metrics and per-image predictions (and, with
    the feature cache, what it held, now that every read is done)."""
    scores = inputs.score(test)
    if inputs.features:
        mlflow.log_params(inputs.features.params())
    y_test = label_matrix(test, tasks)
    return task_metrics(y_test, scores, tasks, "test"), prediction_table(test, tasks, y_test, scores)
