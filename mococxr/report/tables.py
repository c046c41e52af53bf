"""Paper-style comparison tables built from the fine-tune runs in MLflow.

A report reads MLflow and nothing else: :mod:`mococxr.report.runs` finds the finished fine-tune runs,
refuses sets that would compare unlike things, and aligns their per-image test predictions;
:mod:`mococxr.report.tidy_tables` runs one paired bootstrap over the shared test set and
:mod:`mococxr.report.render` renders the tables; this module builds, writes and logs the report. Every
cell of every table is scored on the same resamples, so a difference between two cells is a paired
difference. A cell (architecture x initialization x protocol x label fraction) pools its draws:
replicate metrics are averaged across draws before the percentiles, as MoCo-CXR does.

The improvement table compares one treatment init (``moco`` by default) with baseline inits
(``random`` and ``imagenet``); the labels are the ones the fine-tune grid gave its inits.

The report is itself an MLflow run (``mococxr.kind=report``, same experiment, updated in place when the
same report is re-run: see :mod:`mococxr.report.record`) holding the tables
(Markdown, CSV, LaTeX), the plots and the exact list of runs it used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mococxr.errors import ConfigError
from mococxr.report.bootstrap import METRICS
from mococxr.report.describe import ReportContext, report_context, summary_metrics
from mococxr.report.record import log_report, report_key
from mococxr.report.render import (
    FRACTION_HEADER,
    _slug,
    fraction_label,
    to_latex,
    to_markdown,
    wide_table,
    write_tables,
)
from mococxr.report.runs import (
    PREDICTIONS_ARTIFACT,
    Aligned,
    align_predictions,
    check_comparison,
    check_runs,
    find_runs,
    load_predictions,
)
from mococxr.report.tidy_tables import (
    BASELINES,
    COMPARISONS,
    INIT_ORDER,
    MEAN_TASK,
    PROTOCOL_ORDER,
    TREATMENT,
    _order,
    absolute_table,
    bootstrap_cells,
    improvement_table,
)
from mococxr.tracking import mlflow as mt

__all__ = [
    "BASELINES",
    "COMPARISONS",
    "FRACTION_HEADER",
    "INIT_ORDER",
    "MEAN_TASK",
    "PREDICTIONS_ARTIFACT",
    "PROTOCOL_ORDER",
    "TREATMENT",
    "Aligned",
    "Report",
    "absolute_table",
    "align_predictions",
    "bootstrap_cells",
    "build_report",
    "check_runs",
    "find_runs",
    "format_report",
    "fraction_label",
    "improvement_table",
    "load_predictions",
    "to_latex",
    "to_markdown",
    "wide_table",
    "write_tables",
]


@dataclass
class Report:
    """What ``build_report`` made: tidy tables, the runs used, the files written, the report run."""

    absolute: pd.DataFrame
    improvement: pd.DataFrame
    per_task: dict[str, pd.DataFrame]
    runs: pd.DataFrame
    paths: list[Path] = field(default_factory=list)
    run_id: str | None = None
    skipped_tasks: list[str] = field(default_factory=list)
    context: ReportContext | None = None  # task, dataset, test set, draws, checkpoints: the words around it


def format_report(report: Report) -> str:
    """The report's AUC tables as terminal text: absolute, then the paired improvement when there is one.

    Each table is a blank line, its title, a blank line and its Markdown; ``print(format_report(r))``
    shows what ``mococxr report`` prints. With the report's context (any report ``build_report``
    made), its lines come first, the titles name the task and dataset, and the fraction columns are
    headed ``label fraction 10%``.
    """
    ctx = report.context
    where = f", {ctx.title}" if ctx else ""
    header = FRACTION_HEADER if ctx else ""
    tables = (
        (f"AUC (95% CI){where}", report.absolute),
        (f"AUC difference, paired (95% CI){where}", report.improvement),
    )
    text = "\n".join(
        f"\n{title}\n\n{to_markdown(wide_table(tidy, 'auc', header=header))}"
        for title, tidy in tables
        if len(tidy)
    )
    return ("\n".join(ctx.lines()) + "\n" + text) if ctx else text


# --------------------------------------------------------------------------- the report


def build_report(
    experiment: str,
    *,
    out: str | os.PathLike,
    dataset: str | None = None,
    task: str | None = None,
    backbone: str | None = None,
    n_replicates: int = 500,
    seed: int = 0,
    groups: str = "image",
    treatment: str | None = TREATMENT,
    baseline: str | Sequence[str] = BASELINES,
    log_to_mlflow: bool = True,
    cache_dir: str | os.PathLike | None = None,
    store: mt.Store | None = None,
    tracking_uri: str | None = None,
    workers: int = 8,
    progress: bool = True,
) -> Report:
    """Find the fine-tune runs, bootstrap them together, write and log tables and plots.

    The improvement table compares the ``treatment`` init with the ``baseline`` init(s) the runs
    carry (see :func:`~mococxr.report.runs.check_comparison`; ``treatment=None``: absolute numbers
    only). ``groups="patient"`` resamples patients instead of images. Predictions are cached under
    ``cache_dir`` (default ``out/.cache/predictions``). Runs are read from ``store`` (default: the
    store in force; ``tracking_uri`` opens another). With ``log_to_mlflow`` the report is a run of
    kind ``report`` in ``experiment`` holding every file written and ``runs.json``.
    """
    started = time.monotonic()  # the report run's duration is the work: see mococxr.report.record
    store = _check_arguments(n_replicates, groups, store, tracking_uri)
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    out = _out_folder(out)

    runs = _order(find_runs(experiment, dataset=dataset, task=task, backbone=backbone))
    check_runs(runs)
    present = check_comparison(runs, treatment, baselines)  # tags only: before any download
    cache = cache_dir or out / ".cache" / "predictions"
    predictions = load_predictions(list(runs["run_id"]), cache, workers=workers, progress=progress)
    aligned = align_predictions(predictions)
    results, skipped = bootstrap_cells(runs, aligned, n_replicates=n_replicates, seed=seed, groups=groups)
    absolute = absolute_table(runs, results)
    improvement = improvement_table(runs, results, present, treatment=treatment)
    main_task = MEAN_TASK if MEAN_TASK in results else next(iter(results))
    per_task = {t: absolute[absolute["task"] == t].reset_index(drop=True) for t in results if t != MEAN_TASK}
    context = report_context(experiment, runs, aligned.image_id, aligned.patient_id)
    settings = _settings(dataset, task, backbone, n_replicates, seed, groups, treatment, baselines)
    manifest = _manifest(experiment, settings, context, skipped, runs)
    paths = _write_report(out, absolute, improvement, main_task, list(results), manifest, context)
    report = Report(
        absolute=absolute[absolute["task"] == main_task].reset_index(drop=True),
        improvement=improvement[improvement["task"] == main_task].reset_index(drop=True),
        per_task=per_task,
        runs=runs,
        paths=paths,
        skipped_tasks=skipped,
        context=context,
    )
    if log_to_mlflow:
        report.run_id = _log_report(experiment, out, report, settings, context, started)
    return report


def _settings(
    dataset: str | None,
    task: str | None,
    backbone: str | None,
    n_replicates: int,
    seed: int,
    groups: str,
    treatment: str | None,
    baselines: list[str],
) -> dict:
    """What the report was asked for: its run filters and bootstrap (``runs.json``, the run's params)."""
    return {
        "filters": {"dataset": dataset, "task": task, "backbone": backbone},
        "n_replicates": n_replicates,
        "seed": seed,
        "groups": groups,
        "treatment": treatment,
        "baselines": baselines,
    }


def _manifest(
    experiment: str, settings: dict, context: ReportContext, skipped: list[str], runs: pd.DataFrame
) -> dict:
    """What ``runs.json`` holds: the settings, the test set, the skipped tasks and the runs used."""
    used = runs[["run_id", "backbone", "init", "protocol", "fraction", "draw", "test_manifest_sha256"]]
    return {
        "experiment": experiment,
        **settings,
        "n_test_images": context.n_test_images,
        "n_test_patients": context.n_test_patients,
        "test_source": context.test_source,
        "skipped_tasks": skipped,
        "runs": used.to_dict(orient="records"),
    }


def _out_folder(out: str | os.PathLike) -> Path:
    """The report folder, created; a path naming an existing file is a ConfigError, before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"report out {str(path)!r} is an existing file, not a folder; name a folder (it is created)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, a full disk
        raise ConfigError(f"cannot create the report folder {str(path)!r}: {exc}") from exc
    return path


def _check_arguments(
    n_replicates: int, groups: str, store: mt.Store | None, tracking_uri: str | None
) -> mt.Store:
    """Refuse bad arguments before anything is read; the store the report reads (and logs to)."""
    if n_replicates < 1:
        raise ConfigError(f"n_replicates must be >= 1, got {n_replicates}")
    if groups not in ("image", "patient"):
        raise ConfigError(f"groups must be 'image' or 'patient', got {groups!r}")
    if tracking_uri is not None:
        if store is not None:
            raise ConfigError("build_report: pass store or tracking_uri, not both")
        store = mt.open_store(tracking_uri)
    return mt.current_store(store)


def _write_report(
    out: Path,
    absolute: pd.DataFrame,
    improvement: pd.DataFrame,
    main_task: str,
    tasks: list[str],
    manifest: dict,
    context: ReportContext,
) -> list[Path]:
    """The plots of the main task, the tables, ``report.md``, ``report.html`` and ``runs.json`` under ``out``;
    returns the paths."""
    from mococxr.report.plots import NAMES, plot_curves  # matplotlib only when a report is built

    main = absolute[absolute["task"] == main_task]
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    figures = [
        (
            plot_curves(main, plots / f"{metric}.png", metric=metric, title=context.plot_title()),
            f"Test {NAMES[metric]} against label fraction, task {main_task} (95% paired bootstrap CI bands)",
            [
                "One line per initialization, its band the 95% interval; one panel per architecture and "
                "protocol; the label fraction axis is logarithmic.",
                context.plot_caption(),
            ],
        )
        for metric in METRICS
    ]
    paths = write_tables(
        out,
        absolute,
        improvement,
        main_task,
        tasks,
        f"mococxr report: {context.title}",
        preamble=context.lines(),
        figures=figures,
    )
    paths += [png for png, _, _ in figures]
    runs_json = out / "runs.json"
    runs_json.write_text(json.dumps(manifest, indent=1))
    paths.append(runs_json)
    return paths


def _log_report(
    experiment: str, out: Path, report: Report, settings: dict, context: ReportContext, started: float
) -> str:
    """Create, or update in place, the report's MLflow run (see :mod:`mococxr.report.record`)."""
    runs = report.runs
    backbones = runs["backbone"].unique()
    run_tags = mt.tags(
        kind="report",
        dataset=context.dataset,
        task=context.task,
        backbone=backbones[0] if len(backbones) == 1 else None,
    )
    params = {
        "replicates": settings["n_replicates"],
        "seed": settings["seed"],
        "groups": settings["groups"],
        "treatment": settings["treatment"],
        "baseline": ",".join(settings["baselines"]),
        **{f"filter.{k}": v for k, v in settings["filters"].items()},
    }
    note = "\n\n".join(
        [
            f"**Report**: {context.title}.",
            *context.lines(),
            "Open `report.html` (tables and plots on one page); the same tables in `report.md` and "
            "`tables/` (CSV, LaTeX), the plots in `plots/`, the runs used in `runs.json`.",
        ]
    )
    name = f"report-{_slug(context.task)}-{context.dataset}" + ("-phantom" if context.phantom else "")
    return log_report(
        experiment,
        out,
        report.paths,
        key=report_key(experiment, settings),
        run_name=name,
        run_tags=run_tags,
        params=params,
        note=note,
        metrics=summary_metrics(context, report.absolute, report.improvement),
        started=started,
    )
