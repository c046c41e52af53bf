"""The fine-tuning loop: epochs over the training batches, validation on its cadence, and the model
left at its best validated epoch (:func:`_fit`, which ``train/linear_lr.py`` runs per learning rate)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import mlflow
import pandas as pd
import torch

from mococxr.config import FinetuneConfig
from mococxr.console import progress as progress_bar
from mococxr.data.labels import label_matrix
from mococxr.errors import DataError
from mococxr.train.budget import validation_epochs
from mococxr.train.finetune_inputs import Inputs
from mococxr.train.finetune_metrics import _masked_bce_np, task_metrics
from mococxr.train.head import Classifier, masked_bce
from mococxr.train.precision import Precision


def _fit(
    model: Classifier,
    cfg: FinetuneConfig,
    inputs: Inputs,
    val: pd.DataFrame,
    tasks: list[str],
    *,
    device: torch.device,
    epochs: int,
    progress: bool,
    precision: Precision | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> tuple[int, float]:
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
        metrics = _train_epoch(model, inputs, optimizer, scaler, precision, device)
        if epoch in validate_at:
            t1 = time.perf_counter()
            val_scores = inputs.score(val)
            metrics.update(
                {
                    "val/loss": _masked_bce_np(y_val, val_scores),
                    "val/seconds": time.perf_counter() - t1,
                    **task_metrics(y_val, val_scores, tasks, "val"),
                }
            )
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


def _train_epoch(
    model: Classifier,
    inputs: Inputs,
    optimizer: torch.optim.Optimizer,
    scaler,
    precision: Precision,
    device: torch.device,
) -> dict[str, float]:
    """One pass over ``inputs.train`` in train mode; the epoch's mean loss and its seconds."""
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
    return {"train/loss": loss_sum / max(n, 1), "train/epoch_seconds": time.perf_counter() - t0}
