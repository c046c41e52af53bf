"""What the paper captions read from a family's fine-tune runs: their params, metrics and tags, one row per
run.

Params are the runs' flat config names (``data.frontal_only``, ``preset``) and what finetune adds
(``epochs_resolved``, ``optimizer_steps``, ``linear_lr_chosen``); a param a run did not log takes the
value older runs had or ``""``, a metric NaN, a flag None, so captions over older runs leave the fact
out or say it is not logged instead of failing.
"""

from __future__ import annotations

import math

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.tracking import filters as flt
from mococxr.tracking.mlflow import tag

BEST_AT_LAST_TAG = tag("best_at_last_epoch")
_PARAMS = {
    "head": "standardized",
    "min_steps": "",
    "epochs": "",
    "epochs_resolved": "",
    "optimizer_steps": "",
    "epochs_rule": "",
    "lr": "",
    "batch_size": "",
    "val_every": "1",
    "preset": "cxr",
    "linear_lr": "",
    "linear_lrs": "",
    "linear_lr_chosen": "",
    "data.frontal_only": "",
    "data.policy": "",
    "n_test": "",
}
_LR_SELECT = "lr_select/val_auc/"


def caption_params(experiment: str, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of ``runs`` (``find_runs`` rows): the params, metrics and tags the captions read.

    Params absent from a run take the value older runs had (``head`` standardized, ``preset`` cxr,
    ``val_every`` 1) or ``""``; metrics absent are NaN; ``best_at_last`` is True/False/None (not logged);
    ``lr_select`` maps each candidate linear learning rate to its validation AUC; ``pretrain.frontal_only``
    is the ``data.frontal_only`` of the run's pretraining run (``""`` when that run is not in the store).
    """
    client = MlflowClient()
    ids = list(runs["run_id"])
    found = _run_data(client, client.get_experiment_by_name(experiment).experiment_id, ids)
    pre_ids = list(runs["pretrain_run_id"]) if "pretrain_run_id" in runs else [""] * len(ids)
    pretrain = _pretrain_frontal(client, {p for p in pre_ids if p})
    rows = []
    for rid, pre in zip(ids, pre_ids, strict=True):
        data = found.get(rid)
        params, metrics, tags = (data.params, data.metrics, data.tags) if data else ({}, {}, {})
        rows.append(
            {
                **{k: params.get(k, d) for k, d in _PARAMS.items()},
                "probe_gap": metrics.get("val/probe_gap", math.nan),
                "best_val_auc": metrics.get("best/val_auc", metrics.get("val/best_auc", math.nan)),
                "best_at_last": _at_last(tags.get(BEST_AT_LAST_TAG), metrics.get("best/at_last_epoch")),
                "lr_select": _lr_select(metrics),
                "pretrain.frontal_only": pretrain.get(pre, ""),
            }
        )
    keep = [c for c in ("run_id", "backbone", "init", "protocol", "fraction", "draw") if c in runs]
    return pd.concat([runs[keep].reset_index(drop=True), pd.DataFrame(rows, index=range(len(ids)))], axis=1)


def _run_data(client: MlflowClient, exp_id: str, ids: list[str]) -> dict:
    """Each run's ``RunData`` (params, metrics, tags), 100 run ids per search."""
    found = {}
    for start in range(0, len(ids), 100):
        token = None
        while True:
            chunk = flt.one_of("attributes.run_id", ids[start : start + 100])
            page = client.search_runs([exp_id], chunk, max_results=1000, page_token=token)
            found.update({r.info.run_id: r.data for r in page})
            token = page.token
            if not token:
                break
    return found


def _lr_select(metrics: dict[str, float]) -> dict[float, float]:
    """``{learning rate: validation AUC}`` from a linear run's ``lr_select/val_auc/<lr>`` metrics."""
    out = {}
    for name, value in metrics.items():
        if name.startswith(_LR_SELECT):
            try:
                out[float(name[len(_LR_SELECT) :])] = value
            except ValueError:
                continue
    return out


def _at_last(tag: str | None, metric: float | None) -> bool | None:
    if tag is not None:
        return tag.strip().lower() == "true"
    return None if metric is None or math.isnan(metric) else metric == 1


def _pretrain_frontal(client: MlflowClient, run_ids: set[str]) -> dict[str, str]:
    """``data.frontal_only`` of each pretraining run found in the store."""
    out = {}
    for rid in sorted(run_ids):
        try:
            out[rid] = client.get_run(rid).data.params.get("data.frontal_only", "")
        except MlflowException:
            continue
    return out
