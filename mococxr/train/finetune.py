"""Fine-tuning at a label fraction: ``linear`` (frozen backbone in eval mode, new head) or ``e2e``.

One call is one MLflow run: parameters and ``mococxr.*`` tags, per-epoch train and validation metrics,
the split and draw manifests, and after training the test AUC/AUPRC per task and the per-image test
predictions (``predictions/test.parquet``) from which the report module builds its tables.

The best epoch is chosen by validation AUC alone (and, with ``linear_lr: select``, the linear head's
learning rate: ``train/linear_lr.py``); the test split is read once, after training, with the weights of
that epoch. Nothing computed on the test set can change what was trained or chosen. A run whose best
validated epoch is its last is flagged (``best/at_last_epoch``, tag ``mococxr.best_at_last_epoch``).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.data
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mococxr.config import FinetuneConfig, config_hash, flat_params, to_dict
from mococxr.console import progress as progress_bar
from mococxr.data.dataset import CXRDataset
from mococxr.data.labels import label_matrix
from mococxr.data.phantom import is_phantom
from mococxr.data.prepare import Prepared, open_cache, prepare
from mococxr.data.splits import draw_fraction, make_manifest
from mococxr.data.transforms import build_transform
from mococxr.errors import DataError
from mococxr.models.backbones import build_encoder
from mococxr.tracking import artifacts as ma
from mococxr.tracking import mlflow as mt
from mococxr.tracking import registry
from mococxr.tracking.registry import resolve_init
from mococxr.train.budget import percent, training_budget, validation_epochs
from mococxr.train.features import FeatureCache, cache_root
from mococxr.train.linear_eval import ProbeGap, probe_gap
from mococxr.train.linear_lr import Choice, train_arm
from mococxr.train.precision import Precision
from mococxr.train.precision import resolve as resolve_precision
from mococxr.train.run_notes import describe_run, init_label, result_line

PREDICTIONS_PARQUET = "predictions/test.parquet"
PREDICTIONS_CSV = "predictions/test.csv"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
MANIFEST_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}


class Classifier(nn.Module):
    """An encoder and a new linear head; ``frozen`` keeps the encoder in eval mode without gradients.

    With ``standardize`` (config ``head: standardized``, the default) a frozen encoder's features are
    standardised by a parameter-free BatchNorm (running averages over every batch seen, no affine)
    before the linear layer, as MAE's linear probe does: the probe then does not depend on the scale of
    the features, which differs by orders of magnitude between a random, an ImageNet and a MoCo encoder
    (MoCo's own linear evaluation needs lr 30 for that reason). It is the same standardisation the fast
    linear evaluation applies, and it is still a linear model. ``standardize=False`` (``head: plain``)
    is the paper's linear model: the linear layer directly on the frozen features.
    """

    def __init__(self, encoder: nn.Module, n_out: int, *, frozen: bool, standardize: bool = True):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        standardized = frozen and standardize
        self.norm = nn.BatchNorm1d(encoder.feature_dim, affine=False, momentum=None) if standardized else nn.Identity()
        self.head = nn.Linear(encoder.feature_dim, n_out)
        if frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # frozen BN statistics: the linear protocol never updates the backbone
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]``, or a frozen encoder's features ``[B, feature_dim]`` (the feature cache's)."""
        if x.dim() == 2:
            if not self.frozen:
                raise ValueError("features in place of images: only a frozen encoder's features can be cached")
            return self.head(self.norm(x))
        if self.frozen:
            with torch.no_grad():
                feats = self.encoder.features(x)
        else:
            feats = self.encoder.features(x)
        return self.head(self.norm(feats))


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over the labels that are known; NaN (U-Ignore, unknown) is masked out of the loss."""
    mask = ~torch.isnan(target)
    if not mask.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[mask], target[mask])


def _masked_bce_np(y: np.ndarray, scores: np.ndarray) -> float:
    """The validation counterpart of :func:`masked_bce`, from probabilities (NaN labels left out)."""
    known = ~np.isnan(y)
    p = np.clip(scores[known], 1e-7, 1 - 1e-7)
    return float(-np.mean(y[known] * np.log(p) + (1 - y[known]) * np.log(1 - p))) if known.any() else float("nan")


def task_metrics(y: np.ndarray, scores: np.ndarray, tasks: list[str], prefix: str) -> dict[str, float]:
    """AUC and AUPRC per task (masked) and their means, as MLflow metrics named ``prefix/...``."""
    out: dict[str, float] = {}
    aucs, aps = [], []
    for j, task in enumerate(tasks):
        known = ~np.isnan(y[:, j])
        yj, sj = y[known, j], scores[known, j]
        if len(np.unique(yj)) < 2:
            continue
        auc, ap = roc_auc_score(yj, sj), average_precision_score(yj, sj)
        aucs.append(auc)
        aps.append(ap)
        if len(tasks) > 1:
            key = task.replace(" ", "_")
            out[f"{prefix}/auc_{key}"], out[f"{prefix}/auprc_{key}"] = auc, ap
    if aucs:
        out[f"{prefix}/auc"], out[f"{prefix}/auprc"] = float(np.mean(aucs)), float(np.mean(aps))
    return out


@torch.no_grad()
def predict(model: nn.Module, records: pd.DataFrame, cfg: FinetuneConfig, cache, device,
            precision: Precision | None = None) -> np.ndarray:
    """Probabilities for ``records`` (eval transform, batches of 64), under ``precision``'s autocast if any."""
    precision = precision or Precision()
    model.eval()
    # its own generator: scoring never draws from the global RNG that training's augmentation uses, so
    # the validation cadence (or cached features, which need no loader) cannot change a run's training
    loader = DataLoader(CXRDataset(records, build_transform("eval", cfg.image_size), cache=cache),
                        batch_size=64, shuffle=False, num_workers=cfg.workers, generator=torch.Generator())
    out = []
    for x, _ in loader:
        with precision.autocast():
            out.append(torch.sigmoid(model(precision.batch(x, device)).float()).cpu())
    return torch.cat(out).numpy().astype(np.float64)


@torch.no_grad()
def predict_features(model: Classifier, feats: np.ndarray, device, chunk: int = 4096) -> np.ndarray:
    """:func:`predict` from a frozen encoder's cached features: the head alone, in eval mode."""
    model.eval()
    out = [torch.sigmoid(model(torch.from_numpy(np.array(feats[i:i + chunk])).to(device)).float()).cpu()
           for i in range(0, len(feats), chunk)]
    return torch.cat(out).numpy().astype(np.float64)


@dataclass
class Inputs:
    """What a run's model reads: ``train`` batches (images, or cached features with preset none) and
    ``score(records)``, the probabilities of val or test images; ``features`` is the cache, if used."""

    train: DataLoader
    score: Callable[[pd.DataFrame], np.ndarray]
    features: FeatureCache | None = None


def model_inputs(cfg: FinetuneConfig, model: Classifier, train: pd.DataFrame, tasks: list[str], cache,
                 device, precision: Precision | None = None) -> Inputs:
    """Images through the encoder (end-to-end, or ``feature_cache: false``), or for a linear run the frozen
    encoder's features computed once per image set (train too when there is no augmentation)."""
    if cfg.protocol != "linear" or not cfg.feature_cache:
        return Inputs(train_loader(cfg, train, tasks, cache),
                      lambda records: predict(model, records, cfg, cache, device, precision))
    features = FeatureCache(model.encoder, cfg.image_size, cache_root(cfg.data.cache), images=cache,
                            workers=cfg.workers, device=device)
    loader = feature_loader(cfg, features.features(train), train, tasks) if cfg.preset == "none" else \
        train_loader(cfg, train, tasks, cache)
    return Inputs(loader, lambda records: predict_features(model, features.features(records), device), features)


def feature_loader(cfg: FinetuneConfig, feats: np.ndarray, train: pd.DataFrame, tasks: list[str]) -> DataLoader:
    """:func:`train_loader` over cached features: the same targets, batches, shuffling order and dropped
    last batch, so head-only training sees exactly the batches the image loader would."""
    targets = CXRDataset(train, build_transform("none", cfg.image_size), tasks=tasks).targets
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + cfg.draw)
    return DataLoader(TensorDataset(torch.from_numpy(np.array(feats)), targets), batch_size=cfg.batch_size,
                      shuffle=True, generator=generator, drop_last=len(train) > cfg.batch_size)


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
    train = draw_fraction(data.splits["train"], cfg.fraction, draw=cfg.draw, seed=cfg.seed, task=data.tasks[0])
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


def train_loader(cfg: FinetuneConfig, train: pd.DataFrame, tasks: list[str], cache) -> DataLoader:
    """Shuffled, augmented training batches (seeded by seed and draw); the last partial batch is dropped
    unless the whole draw fits in one batch, so ``len()`` is the optimizer steps of one epoch."""
    train_set = CXRDataset(train, build_transform(cfg.preset, cfg.image_size), tasks=tasks, cache=cache)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + cfg.draw)
    return DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                      num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size)


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

    torch.manual_seed(cfg.seed * 1_000_003 + cfg.draw)
    init_kind, state, origin = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=init_kind, state_dict=state)
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)
    model = precision.model(Classifier(encoder, len(tasks), frozen=cfg.protocol == "linear",
                                       standardize=cfg.head == "standardized"), device)
    cache = open_cache(cfg.data, pd.concat([train, val, test], ignore_index=True), cfg.image_size)
    inputs = model_inputs(cfg, model, train, tasks, cache, device, precision)
    budget = training_budget(cfg, len(inputs.train), len(train))

    phantom = is_phantom(cfg.data.root)
    sizes = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
    note = describe_run(cfg, init_kind, origin, budget=budget, phantom=phantom, sizes=sizes)
    run_tags = {**_run_tags(cfg, init_kind, origin, manifests), NOTE_TAG: note, **(extra_tags or {})}
    with mt.start_run(cfg.experiment, run_name=cfg.run_name or _run_name(cfg, init_kind), run_tags=run_tags,
                      parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        mlflow.log_params({**flat_params(cfg), **budget.params(), **precision.params(), "init_resolved": init_kind,
                           "phantom": phantom, **_origin_params(origin), **sizes})
        ma.log_json(to_dict(cfg), "config.json")
        _log_manifests(manifests, {"train": train, "val": val, "test": test}, cfg, phantom=phantom, run_id=run_id)
        registry.log_model_input(run_id, origin)
        choice = train_arm(_fit, model, cfg, inputs, val, tasks, device=device, epochs=budget.epochs,
                           progress=progress, precision=precision)
        best_epoch, best_auc = choice.best_epoch, choice.best_auc
        # a linear run's probe comes after training: its loaders never draw from the training RNG
        gap = probe_gap(model.encoder, train, val, tasks, best_auc, image_size=cfg.image_size, cache=cache,
                        workers=cfg.workers, device=device,
                        features=inputs.features.features if inputs.features else None) \
            if cfg.protocol == "linear" else None

        test_metrics, predictions = _score_test(inputs, test, tasks)
        _log_outcome(choice, budget.epochs, test_metrics, predictions, gap)
        mlflow.set_tag(NOTE_TAG, note + choice.describe()
                       + result_line(best_epoch, budget.epochs, best_auc, test_metrics, gap))
    if origin.get("registry_version"):  # after FINISHED, so the recount includes this run
        registry.record_finetune_use(origin["registered_model"], origin["registry_version"])
    return FinetuneResult(run_id, best_epoch, best_auc, test_metrics, predictions,
                          choice.lr if choice.rule == "select" else None)


def _score_test(inputs: Inputs, test: pd.DataFrame, tasks: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """The test set, read once with the chosen epoch's weights: metrics and per-image predictions (and, with
    the feature cache, what it held, now that every read is done)."""
    scores = inputs.score(test)
    if inputs.features:
        mlflow.log_params(inputs.features.params())
    y_test = label_matrix(test, tasks)
    return task_metrics(y_test, scores, tasks, "test"), prediction_table(test, tasks, y_test, scores)


def _run_tags(cfg: FinetuneConfig, init_kind: str, origin: dict, manifests: dict) -> dict[str, str]:
    """The run's ``mococxr.*`` tags (with ``init_fallback`` when init auto fell back to random)."""
    return {**mt.tags(
        kind="finetune", backbone=cfg.backbone, init=init_label(init_kind), protocol=cfg.protocol,
        dataset=cfg.data.dataset, task=cfg.data.task, label_fraction=cfg.fraction, draw=cfg.draw,
        pretrain_run_id=origin.get("run_id"), checkpoint_epoch=origin.get("epoch"),
        registry_version=origin.get("registry_version"), manifest_sha256=manifests["train"].sha256,
        test_manifest_sha256=manifests["test"].sha256, config_hash=config_hash(cfg), preset=cfg.preset,
        image_size=cfg.image_size,
    ), **registry.fallback_tags(origin)}


def _log_outcome(choice: Choice, epochs: int, test_metrics: dict[str, float], predictions: pd.DataFrame,
                 gap: ProbeGap | None = None) -> None:
    """Summary metrics (the lr choice's and the probe's, for a linear run) and the per-image test
    predictions of the chosen epoch. ``best/at_last_epoch`` (and its tag) flags a best validated epoch
    that is the last one: the validation AUC was still rising, so the budget may be short."""
    # best/* are the summary a user reads in the runs table; best_epoch and val/best_auc are kept
    # under their old names for code and saved searches that read them.
    best_epoch, best_auc, at_last = choice.best_epoch, choice.best_auc, choice.best_epoch == epochs
    if choice.rule:
        mlflow.log_params(choice.params())
        mlflow.set_tag(mt.tag("linear_lr"), f"{choice.lr:g}")
    mlflow.set_tag(mt.tag("best_at_last_epoch"), str(at_last).lower())
    mlflow.log_metrics({"best/epoch": best_epoch, "best/val_auc": best_auc, "best_epoch": best_epoch,
                        "val/best_auc": best_auc, "best/at_last_epoch": float(at_last), **choice.metrics(),
                        **test_metrics, **(gap.metrics() if gap else {})})
    ma.log_parquet(predictions, PREDICTIONS_PARQUET)  # what the report reads
    _log_csv(predictions, PREDICTIONS_CSV)  # what the MLflow UI previews as a table


def _fit(model: Classifier, cfg: FinetuneConfig, inputs: Inputs, val: pd.DataFrame, tasks: list[str], *,
         device: torch.device, epochs: int, progress: bool, precision: Precision | None = None,
         log: Callable[[dict[str, float], int], None] | None = None) -> tuple[int, float]:
    """Train for ``epochs`` over ``inputs.train``, validate on the cadence of ``cfg.val_every`` (always after
    the last epoch), log each epoch's metrics (to the run, or to ``log(metrics, epoch)``), and leave ``model``
    at the best validated epoch by val AUC.

    Returns (best epoch, its val AUC). The validation split is the only thing that chooses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = precision or Precision()
    scaler = precision.grad_scaler()  # fp16 on CUDA only; otherwise torch's no-op scaler
    y_val = label_matrix(val, tasks)
    validate_at = set(validation_epochs(epochs, cfg.val_every))
    best_auc, best_epoch, best_state = -math.inf, 0, None
    # a bar on a terminal, a plain line every few seconds in a log file (never carriage-return redraws)
    bar = progress_bar(range(1, epochs + 1), f"{cfg.protocol} {cfg.fraction:g} d{cfg.draw}", enabled=progress)
    for epoch in bar:
        model.train()
        t0, loss_sum, n = time.perf_counter(), 0.0, 0
        for x, target in inputs.train:
            x, target = precision.batch(x, device), target.to(device)
            with precision.autocast():
                logits = model(x)
            loss = masked_bce(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(x)
            n += len(x)
        metrics = {"train/loss": loss_sum / max(n, 1), "train/epoch_seconds": time.perf_counter() - t0}
        if epoch in validate_at:
            t1 = time.perf_counter()
            val_scores = inputs.score(val)
            metrics.update({"val/loss": _masked_bce_np(y_val, val_scores), "val/seconds": time.perf_counter() - t1,
                            **task_metrics(y_val, val_scores, tasks, "val")})
            val_auc = metrics.get("val/auc", float("nan"))
            if val_auc > best_auc:  # the only model choice, made on validation alone
                best_auc, best_epoch = val_auc, epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(val_auc=f"{val_auc:.3f}", best=best_epoch)
        if log is None:
            mlflow.log_metrics(metrics, step=epoch)
        else:
            log(metrics, epoch)
    if best_state is None:
        raise DataError("validation AUC was undefined at every validated epoch (single-class val split?)")
    model.load_state_dict(best_state)
    return best_epoch, best_auc


def prediction_table(records: pd.DataFrame, tasks: list[str], y: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """One row per test image: image_id, patient_id, ``label:<task>`` and ``score:<task>`` columns."""
    table = pd.DataFrame({"image_id": records["image_id"].astype(str).to_numpy(),
                          "patient_id": records["patient_id"].astype(str).to_numpy()})
    for j, task in enumerate(tasks):
        table[f"label:{task}"] = y[:, j]
        table[f"score:{task}"] = scores[:, j]
    return table


def _run_name(cfg: FinetuneConfig, kind: str) -> str:
    return f"{init_label(kind)}-{cfg.protocol}-{cfg.fraction:g}-d{cfg.draw}"


def _origin_params(origin: dict) -> dict[str, str]:
    """The checkpoint behind a ``models:/`` init as params, searchable (``params.init_registered_model``)."""
    keys = {"registered_model": "init_registered_model", "registry_version": "init_registry_version",
            "model_id": "init_model_id"}
    return {param: str(origin[key]) for key, param in keys.items() if origin.get(key) is not None}


def _log_manifests(manifests: dict, parts: dict[str, pd.DataFrame], cfg: FinetuneConfig, *, phantom: bool,
                   run_id: str) -> None:
    """Each manifest as a JSON artifact and, with its images' ids and patients, as an MLflow dataset
    input (the UI's Dataset column) whose digest is the manifest's hash."""
    dataset = f"{cfg.data.dataset}{'-phantom' if phantom else ''}"
    names = {"train": f"{dataset} train {percent(cfg.fraction)} draw {cfg.draw}", "val": f"{dataset} val",
             "test": f"{dataset} test"}
    inputs = []
    for name, manifest in manifests.items():
        ma.log_json(manifest.to_dict(), f"manifests/{name}.json", run_id=run_id)
        frame = parts[name][["image_id", "patient_id"]].astype(str).reset_index(drop=True)
        with warnings.catch_warnings():  # a local path can be read as several kinds of source: any will do
            warnings.simplefilter("ignore", UserWarning)
            inputs.append(mlflow.data.from_pandas(frame, source=str(Path(cfg.data.root).resolve()),
                                                  name=names[name], digest=manifest.sha256[:16]))
    ma.log_inputs(inputs, contexts=[MANIFEST_CONTEXTS[n] for n in manifests])


def _log_csv(df: pd.DataFrame, artifact_file: str) -> None:
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / path.name, index=False)
        mlflow.log_artifact(str(Path(tmp) / path.name), str(path.parent))
