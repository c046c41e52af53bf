"""The runs a paper family reads: the report over one experiment's fine-tune runs (of one task),
after checking that they hold the inits and protocols the family needs, with the params its captions
read; and the MLflow link to a Table 2 row's pretraining run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import DataError, TrackingError
from mococxr.report.paper_notes import PaperNotes
from mococxr.report.paper_params import caption_params
from mococxr.report.paper_tables import TREATMENT
from mococxr.report.runs import find_runs
from mococxr.report.tables import Report, build_report
from mococxr.tracking import mlflow as mt


@dataclass
class _Family:
    """One experiment's (or task's) report, and the params of its runs the captions read."""

    report: Report
    params: pd.DataFrame


def _gather(
    experiment: str,
    name: str,
    *,
    out: Path,
    notes: PaperNotes,
    n_replicates: int,
    seed: int,
    store: mt.Store | None,
    inits: Sequence[str],
    protocols: Sequence[str],
    task: str | None = None,
    treatment: str | None = TREATMENT,
    backbone: str | None = None,
) -> _Family:
    """The report over ``experiment``'s runs (of ``task``), after checking the inits and protocols it
    needs."""
    mt.current_store(store)
    where = f"experiment {experiment!r}" + (f" (task {task!r})" if task else "")
    try:
        runs = find_runs(experiment, task=task, backbone=backbone)
    except TrackingError as exc:
        raise DataError(f"{name}: {exc}; run the fine-tune grid into it first") from None
    for column, needed in (("init", inits), ("protocol", protocols)):
        missing = [v for v in needed if v not in set(runs[column])]
        if missing:
            raise DataError(
                f"{name}: {where} has no finished fine-tune runs of {column} {missing} "
                f"(it has {sorted(set(runs[column]))})"
            )
    build = out / ".build" / (name + (f"-{_key(task)}" if task else ""))
    report = build_report(
        experiment,
        out=build,
        task=task,
        backbone=backbone,
        n_replicates=n_replicates,
        seed=seed,
        treatment=treatment,
        baseline=notes.baseline,
        log_to_mlflow=False,
        cache_dir=out / ".cache" / "predictions",
        store=store,
        progress=False,
    )
    return _Family(report, caption_params(experiment, report.runs))


def _run_link(run_id: str, label: str) -> str:
    """The MLflow UI's address of a run, relative to the UI's root: ``#/experiments/<id>/runs/<run id>``."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise DataError(
            f"paper-table2: row {label!r} names pretraining run {run_id!r}, which is not in the "
            f"store ({str(exc).splitlines()[0]})"
        ) from None
    return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"


def _key(text: str) -> str:
    """A task as a metric-name segment and a folder name."""
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in str(text))
