"""What a fine-tune run measures: masked validation loss, AUC and AUPRC per task and their means, and
the per-image prediction table of the test set."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score


def _masked_bce_np(y: np.ndarray, scores: np.ndarray) -> float:
    """The validation counterpart of :func:`masked_bce`, from probabilities (NaN labels left out)."""
    known = ~np.isnan(y)
    p = np.clip(scores[known], 1e-7, 1 - 1e-7)
    return (
        float(-np.mean(y[known] * np.log(p) + (1 - y[known]) * np.log(1 - p)))
        if known.any()
        else float("nan")
    )


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


def prediction_table(
    records: pd.DataFrame, tasks: list[str], y: np.ndarray, scores: np.ndarray
) -> pd.DataFrame:
    """One row per test image: image_id, patient_id, ``label:<task>`` and ``score:<task>`` columns."""
    table = pd.DataFrame(
        {
            "image_id": records["image_id"].astype(str).to_numpy(),
            "patient_id": records["patient_id"].astype(str).to_numpy(),
        }
    )
    for j, task in enumerate(tasks):
        table[f"label:{task}"] = y[:, j]
        table[f"score:{task}"] = scores[:, j]
    return table
