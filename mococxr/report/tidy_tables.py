"""The tidy tables of a report: one paired bootstrap over every cell, and the absolute and improvement
tables it gives.

Every cell of every table is scored on the same resamples, so a difference between two cells is a
paired difference. A cell (architecture x initialization x protocol x label fraction) pools its draws:
replicate metrics are averaged across draws before the percentiles, as MoCo-CXR does. The improvement
table compares one treatment init (``moco`` by default) with baseline inits (``random`` and
``imagenet``); the labels are the ones the fine-tune grid gave its inits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mococxr.config import PROTOCOLS
from mococxr.errors import ConfigError, DataError
from mococxr.report.bootstrap import BootstrapResult, bootstrap_counts, paired_bootstrap
from mococxr.report.runs import CELL, Aligned, cell_name

TREATMENT = "moco"
BASELINES = ("random", "imagenet")
INIT_ORDER = ("random", "imagenet", "moco")
PROTOCOL_ORDER = PROTOCOLS  # linear before e2e, as the paper's tables
# (treatment protocol, baseline protocol): like for like, and the paper's "MoCo linear beats a
# fully fine-tuned baseline" comparison.
COMPARISONS = (("e2e", "e2e"), ("linear", "linear"), ("linear", "e2e"))
MEAN_TASK = "mean"


def _order(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: architecture, then random < imagenet < moco, then linear < e2e."""

    def rank(values: pd.Series, order: Sequence[str]) -> pd.Series:
        known = {v: i for i, v in enumerate(order)}
        return values.map(lambda v: (known.get(v, len(order)), v))

    return runs.sort_values(
        CELL + ["draw"],
        key=lambda s: (
            rank(s, INIT_ORDER)
            if s.name == "init"
            else rank(s, PROTOCOL_ORDER)
            if s.name == "protocol"
            else s
        ),
    ).reset_index(drop=True)


def bootstrap_cells(
    runs: pd.DataFrame, aligned: Aligned, *, n_replicates: int = 500, seed: int = 0, groups: str = "image"
) -> tuple[dict[str, BootstrapResult], list[str]]:
    """One paired bootstrap per task over every cell, plus the task mean when there are several tasks.

    One counts matrix is drawn over all test images (by patient with ``groups="patient"``); each task
    keeps the columns of its labelled images, so all tasks and cells share the same resamples. A task
    whose labelled test images hold one class has no AUC and is skipped (and listed). The task mean
    averages the task replicates one by one, as ``test/auc`` averages the tasks of one run.
    """
    if groups not in ("image", "patient"):
        raise ConfigError(f"groups must be 'image' or 'patient', got {groups!r}")
    n = aligned.image_id.size
    counts = bootstrap_counts(
        n, n_replicates, seed=seed, groups=aligned.patient_id if groups == "patient" else None
    )
    cells = {cell_name(*key): list(cell["run_id"]) for key, cell in _order(runs).groupby(CELL, sort=False)}
    results, skipped = {}, []
    for j, task in enumerate(aligned.tasks):
        y = aligned.labels[:, j]
        known = ~np.isnan(y)
        if not known.any() or np.unique(y[known]).size < 2:
            skipped.append(task)
            continue
        scores = {name: [aligned.scores[rid][known, j] for rid in ids] for name, ids in cells.items()}
        results[task] = paired_bootstrap(y[known], scores, counts=counts[:, known])
    if not results:
        raise DataError(f"no task has both classes among its labelled test images: {aligned.tasks}")
    if len(results) > 1:
        results[MEAN_TASK] = _mean_over_tasks(list(results.values()))
    return results, skipped


def _mean_over_tasks(parts: list[BootstrapResult]) -> BootstrapResult:
    first = parts[0]
    point = {
        m: {c: float(np.mean([p.point[m][c] for p in parts])) for c in first.names} for m in first.metrics
    }
    reps = {
        m: {c: np.mean([p.replicates[m][c] for p in parts], axis=0) for c in first.names}
        for m in first.metrics
    }
    single = np.logical_or.reduce([p.single_class for p in parts])
    return BootstrapResult(first.names, first.metrics, first.ci, point, reps, single, dict(first.n_draws))


def absolute_table(runs: pd.DataFrame, results: Mapping[str, BootstrapResult]) -> pd.DataFrame:
    """Tidy table: one row per task x cell x metric with point, lo, hi, draws and the run ids."""
    rows = []
    for task, res in results.items():
        for key, cell in _order(runs).groupby(CELL, sort=False):
            name = cell_name(*key)
            for metric in res.metrics:
                iv = res.interval(name, metric)
                rows.append(
                    {
                        "task": task,
                        **dict(zip(CELL, key, strict=True)),
                        "metric": metric,
                        "point": iv.point,
                        "lo": iv.lo,
                        "hi": iv.hi,
                        "n_draws": len(cell),
                        "n_replicates": res.n_replicates,
                        "n_single_class": res.n_single_class,
                        "run_ids": " ".join(cell["run_id"]),
                    }
                )
    return pd.DataFrame(rows)


def improvement_table(
    runs: pd.DataFrame,
    results: Mapping[str, BootstrapResult],
    baselines: Sequence[str],
    *,
    treatment: str | None = TREATMENT,
) -> pd.DataFrame:
    """Tidy table of paired differences ``treatment - baseline`` on the same replicates.

    For every architecture, fraction and baseline init present: e2e vs e2e, linear vs linear and
    linear (treatment) vs e2e (baseline). Empty when no run carries the treatment or a baseline.
    """
    present = set(map(tuple, runs[CELL].drop_duplicates().to_numpy().tolist()))
    rows = []
    for task, res in results.items():
        for backbone in _order(runs)["backbone"].unique():
            for base in baselines:
                for pa, pb in COMPARISONS:
                    for fraction in sorted(runs["fraction"].unique()):
                        a, b = (backbone, treatment, pa, fraction), (backbone, base, pb, fraction)
                        if a not in present or b not in present:
                            continue
                        for metric in res.metrics:
                            d = res.diff(cell_name(*a), cell_name(*b), metric)
                            rows.append(
                                {
                                    "task": task,
                                    "backbone": backbone,
                                    "comparison": f"{treatment} {pa} - {base} {pb}",
                                    "baseline": base,
                                    "protocol_a": pa,
                                    "protocol_b": pb,
                                    "fraction": fraction,
                                    "metric": metric,
                                    "point": d.point,
                                    "lo": d.lo,
                                    "hi": d.hi,
                                    "frac_greater": d.frac_greater,
                                }
                            )
    columns = [
        "task",
        "backbone",
        "comparison",
        "baseline",
        "protocol_a",
        "protocol_b",
        "fraction",
        "metric",
        "point",
        "lo",
        "hi",
        "frac_greater",
    ]
    return pd.DataFrame(rows, columns=columns)
