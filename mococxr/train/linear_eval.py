"""Fast linear evaluation: frozen features once, a logistic regression per task, validation AUC.

This is the sweep objective, the per-epoch pretraining monitor and ``mococxr linear-eval``
(:func:`evaluate`). It replaces "train a linear head through the frozen backbone with augmentation for
many epochs" by one no-grad pass over the images (eval transform) and scikit-learn's L-BFGS logistic
regression, with the inverse regularisation C chosen on the validation split. The test split is never
touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from mococxr.config import FinetuneConfig
from mococxr.data.cache import ImageCache
from mococxr.data.dataset import CXRDataset
from mococxr.data.labels import label_matrix
from mococxr.data.prepare import Prepared, open_cache, prepare
from mococxr.data.splits import draw_fraction
from mococxr.data.transforms import build_transform
from mococxr.errors import DataError
from mococxr.models.backbones import build_encoder
from mococxr.tracking import mlflow as mt
from mococxr.train.inits import resolve_init

DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class LinearEvalResult:
    auc: float  # mean validation AUC over tasks
    per_task: dict[str, float]
    C: dict[str, float]
    seconds: float
    n_train: int
    n_val: int

    def metrics(self, prefix: str = "val/linear_") -> dict[str, float]:
        out = {f"{prefix}auc": self.auc}
        if len(self.per_task) > 1:
            out.update({f"{prefix}auc_{t.replace(' ', '_')}": v for t, v in self.per_task.items()})
        return out


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    records: pd.DataFrame,
    *,
    image_size: int,
    batch_size: int = 64,
    cache: ImageCache | None = None,
    workers: int = 0,
    device: torch.device | str | None = None,
    mixed_precision: bool = True,
) -> np.ndarray:
    """Frozen features [n, feature_dim] with the eval transform, in records order.

    ``device`` defaults to the encoder's own device, so a monitor called mid-pretraining on a GPU
    neither moves the encoder nor feeds it tensors from the wrong device. On CUDA the forward runs
    under autocast unless ``mixed_precision=False`` (the fine-tune feature cache, whose features must
    equal the full-precision forward a run would otherwise make).
    """
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(
        CXRDataset(records, build_transform("eval", image_size), cache=cache),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        generator=torch.Generator(),
    )  # never draws from the global RNG training augments with
    feats = []
    for images, _ in loader:
        with torch.autocast("cuda", enabled=device.type == "cuda" and mixed_precision):
            feats.append(encoder.features(images.to(device)).float().cpu())
    encoder.train(was_training)
    return torch.cat(feats).numpy()


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    task: str = "task",
) -> tuple[float, float, LogisticRegression, StandardScaler]:
    """Best (C, val AUC, model, scaler) for one task; rows with a NaN label are left out."""
    tr, va = ~np.isnan(y_train), ~np.isnan(y_val)
    for name, y in (("train", y_train[tr]), ("val", y_val[va])):
        if len(np.unique(y)) < 2:
            raise DataError(f"linear evaluation of {task!r}: the {name} split holds a single class")
    scaler = StandardScaler().fit(x_train[tr])
    xt, xv = scaler.transform(x_train[tr]), scaler.transform(x_val[va])
    best: tuple[float, float, LogisticRegression] | None = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=2000).fit(xt, y_train[tr])
        auc = roc_auc_score(y_val[va], clf.decision_function(xv))
        if best is None or auc > best[1]:
            best = (C, auc, clf)
    assert best is not None
    return best[0], float(best[1]), best[2], scaler


@dataclass
class ProbeGap:
    """A linear fine-tune run's best validation AUC against the fast probe on the same images.

    ``gap`` = probe AUC - run AUC: positive means the trained head is below what a converged linear
    model on the same frozen features reaches. ``gap`` is None when some task the run's AUC averages
    could not be probed (a single class among the draw's training labels).
    """

    probe_auc: float
    run_auc: float
    gap: float | None
    per_task: dict[str, float]
    seconds: float
    n_train: int

    def metrics(self) -> dict[str, float]:
        out = {"val/probe_auc": self.probe_auc, "val/probe_seconds": self.seconds}
        return out if self.gap is None else {**out, "val/probe_gap": self.gap}

    def describe(self) -> str:
        text = (
            f"**Probe**: a logistic regression on the frozen features of the same {self.n_train} training "
            f"images (eval transform, C chosen on validation) reaches validation AUC {self.probe_auc:.4f} "
            f"(metric `val/probe_auc`, {self.seconds:.1f} s)"
        )
        if self.gap is None:
            return text + "; no gap: some task has a single class among the training labels."
        verdict = (
            "the head is below the probe: not converged" if self.gap > 0 else "the head matches the probe"
        )
        return (
            text
            + f"; gap to this run's best {self.run_auc:.4f}: {self.gap:+.4f} (`val/probe_gap`; {verdict})."
        )


def probe_gap(
    encoder: torch.nn.Module,
    train: pd.DataFrame,
    val: pd.DataFrame,
    tasks: Sequence[str],
    run_auc: float,
    *,
    image_size: int,
    cache: ImageCache | None = None,
    workers: int = 0,
    device: torch.device | str | None = None,
    features: Callable[[pd.DataFrame], np.ndarray] | None = None,
) -> ProbeGap | None:
    """The fast probe (:func:`fit_probe`) on ``train`` and ``val``, set against a run's best val AUC.

    Costs one no-grad pass over train and val (none with ``features``, a lookup such as the fine-tune
    feature cache's) and the L-BFGS fits. Tasks with a single class in train or val are left out; None
    when no task is left.
    """
    t0 = time.perf_counter()
    y_tr, y_va = label_matrix(train, tasks), label_matrix(val, tasks)
    two = [[len(np.unique(y[~np.isnan(y[:, j]), j])) == 2 for j in range(len(tasks))] for y in (y_tr, y_va)]
    probed = [j for j in range(len(tasks)) if two[0][j] and two[1][j]]
    if not probed:
        return None
    if features is None:

        def features(records: pd.DataFrame) -> np.ndarray:
            return extract_features(
                encoder, records, image_size=image_size, cache=cache, workers=workers, device=device
            )

    x_tr, x_va = features(train), features(val)
    per_task = {tasks[j]: fit_probe(x_tr, y_tr[:, j], x_va, y_va[:, j], task=tasks[j])[1] for j in probed}
    probe_auc = float(np.mean(list(per_task.values())))
    scored = [j for j in range(len(tasks)) if two[1][j]]  # the tasks the run's val AUC averages
    gap = probe_auc - run_auc if probed == scored else None
    return ProbeGap(probe_auc, run_auc, gap, per_task, time.perf_counter() - t0, len(train))


def linear_eval(
    encoder: torch.nn.Module,
    train: pd.DataFrame,
    val: pd.DataFrame,
    tasks: Sequence[str],
    *,
    image_size: int,
    cache: ImageCache | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    batch_size: int = 64,
) -> LinearEvalResult:
    """Validation AUC of logistic probes on frozen features of ``encoder`` (policy applied upstream)."""
    t0 = time.perf_counter()
    x_tr = extract_features(encoder, train, image_size=image_size, cache=cache, batch_size=batch_size)
    x_va = extract_features(encoder, val, image_size=image_size, cache=cache, batch_size=batch_size)
    y_tr, y_va = label_matrix(train, tasks), label_matrix(val, tasks)
    per_task, chosen = {}, {}
    for j, task in enumerate(tasks):
        C, auc, _, _ = fit_probe(x_tr, y_tr[:, j], x_va, y_va[:, j], Cs=Cs, task=task)
        per_task[task], chosen[task] = auc, C
    return LinearEvalResult(
        auc=float(np.mean(list(per_task.values()))),
        per_task=per_task,
        C=chosen,
        seconds=time.perf_counter() - t0,
        n_train=len(train),
        n_val=len(val),
    )


def make_monitor(
    data: Prepared, image_size: int, *, max_train: int = 2000, seed: int = 0
) -> Callable[[int, torch.nn.Module, dict[str, float]], dict[str, float]]:
    """A pretraining epoch callback logging ``val/linear_auc`` on the labeled splits of ``data``.

    The train side is a patient-level stratified subsample of at most ``max_train`` images so the
    monitor costs seconds per epoch even on CheXpert. With ``data.config.cache`` the images come from
    the pre-resized cache (the one pretraining built covers them: both are train and val patients).
    """
    train, val = data.splits["train"], data.splits["val"]
    if len(train) > max_train:
        train = draw_fraction(train, max_train / len(train), draw=0, seed=seed, task=data.tasks[0])
    cache = open_cache(data.config, pd.concat([train, val], ignore_index=True), image_size)

    def monitor(epoch: int, encoder: torch.nn.Module, metrics: dict[str, float]) -> dict[str, float]:
        return linear_eval(encoder, train, val, data.tasks, image_size=image_size, cache=cache).metrics()

    return monitor


def evaluate(
    cfg: FinetuneConfig, *, data: Prepared | None = None, store: mt.Store | None = None
) -> LinearEvalResult:
    """Fast linear evaluation of ``cfg.init`` (random, imagenet, a file or a models:/ or runs:/ URI) on the
    train and val splits of ``cfg.data``; ``data`` is prepared from ``cfg.data`` when not given."""
    data = prepare(cfg.data) if data is None else data
    if cfg.init.startswith(("models:/", "runs:/")):
        mt.current_store(store)  # only a registry or run URI needs the store
    kind, state, _ = resolve_init(cfg.init, cfg.backbone)
    encoder = build_encoder(cfg.backbone, init=kind, state_dict=state)
    cache = open_cache(cfg.data, data.labeled, cfg.image_size)
    return linear_eval(
        encoder, data.splits["train"], data.splits["val"], data.tasks, image_size=cfg.image_size, cache=cache
    )
