"""Paper-style comparison tables built from the fine-tune runs in MLflow.

A report reads MLflow and nothing else: :mod:`mococxr.report.runs` finds the finished fine-tune runs,
refuses sets that would compare unlike things, and aligns their per-image test predictions; this
module runs one paired bootstrap over the shared test set and renders the tables. Every cell of every
table is scored on the same resamples, so a difference between two cells is a paired difference. A
cell (architecture x initialization x protocol x label fraction) pools its draws: replicate metrics
are averaged across draws before the percentiles, as MoCo-CXR does.

The improvement table compares one treatment init (``moco`` by default) with baseline inits
(``random`` and ``imagenet``); the labels are the ones the fine-tune grid gave its inits.

The report is itself an MLflow run (``mococxr.kind=report``, same experiment, updated in place when the
same report is re-run: see :mod:`mococxr.report.record`) holding the tables
(Markdown, CSV, LaTeX), the plots and the exact list of runs it used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mococxr.config import PROTOCOLS
from mococxr.errors import ConfigError, DataError
from mococxr.report.bootstrap import METRICS, BootstrapResult, bootstrap_counts, paired_bootstrap
from mococxr.report.describe import ReportContext, percent, report_context, summary_metrics
from mococxr.report.record import log_report, report_key
from mococxr.report.runs import (
    CELL,
    PREDICTIONS_ARTIFACT,
    Aligned,
    align_predictions,
    cell_name,
    check_comparison,
    check_runs,
    find_runs,
    load_predictions,
)
from mococxr.tracking import mlflow as mt

__all__ = [
    "PREDICTIONS_ARTIFACT", "Aligned", "Report", "absolute_table", "align_predictions", "bootstrap_cells",
    "build_report", "check_runs", "find_runs", "format_report", "fraction_label", "improvement_table",
    "load_predictions", "to_latex", "to_markdown", "wide_table", "write_tables",
]

TREATMENT = "moco"
BASELINES = ("random", "imagenet")
INIT_ORDER = ("random", "imagenet", "moco")
PROTOCOL_ORDER = PROTOCOLS  # linear before e2e, as the paper's tables
# (treatment protocol, baseline protocol): like for like, and the paper's "MoCo linear beats a
# fully fine-tuned baseline" comparison.
COMPARISONS = (("e2e", "e2e"), ("linear", "linear"), ("linear", "e2e"))
MEAN_TASK = "mean"


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


# --------------------------------------------------------------------------- bootstrap and tables


def _order(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: architecture, then random < imagenet < moco, then linear < e2e."""
    def rank(values: pd.Series, order: Sequence[str]) -> pd.Series:
        known = {v: i for i, v in enumerate(order)}
        return values.map(lambda v: (known.get(v, len(order)), v))
    return runs.sort_values(CELL + ["draw"], key=lambda s: rank(s, INIT_ORDER) if s.name == "init" else
                            rank(s, PROTOCOL_ORDER) if s.name == "protocol" else s).reset_index(drop=True)


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
    counts = bootstrap_counts(n, n_replicates, seed=seed, groups=aligned.patient_id if groups == "patient" else None)
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
    point = {m: {c: float(np.mean([p.point[m][c] for p in parts])) for c in first.names} for m in first.metrics}
    reps = {m: {c: np.mean([p.replicates[m][c] for p in parts], axis=0) for c in first.names} for m in first.metrics}
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
                rows.append({"task": task, **dict(zip(CELL, key, strict=True)), "metric": metric,
                             "point": iv.point, "lo": iv.lo, "hi": iv.hi, "n_draws": len(cell),
                             "n_replicates": res.n_replicates, "n_single_class": res.n_single_class,
                             "run_ids": " ".join(cell["run_id"])})
    return pd.DataFrame(rows)


def improvement_table(
    runs: pd.DataFrame, results: Mapping[str, BootstrapResult], baselines: Sequence[str], *,
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
                            rows.append({"task": task, "backbone": backbone,
                                         "comparison": f"{treatment} {pa} - {base} {pb}",
                                         "baseline": base, "protocol_a": pa, "protocol_b": pb,
                                         "fraction": fraction, "metric": metric, "point": d.point,
                                         "lo": d.lo, "hi": d.hi, "frac_greater": d.frac_greater})
    columns = ["task", "backbone", "comparison", "baseline", "protocol_a", "protocol_b", "fraction",
               "metric", "point", "lo", "hi", "frac_greater"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- rendering


FRACTION_HEADER = "label fraction "  # what rendered tables put before each percentage column heading


def fraction_label(fraction: float) -> str:
    """0.001 -> '0.1%', 0.01 -> '1%', 1.0 -> '100%' (the paper's column headings)."""
    return percent(fraction)


def wide_table(tidy: pd.DataFrame, metric: str = "auc", *, task: str | None = None, digits: int = 3,
               header: str = "") -> pd.DataFrame:
    """A paper-style table of strings: rows = cells (or comparisons), columns = label fractions.

    Works on either tidy table: rows are (Architecture, Init, Protocol) for the absolute table, a
    cell reading ``0.812 (0.790, 0.833)``, and (Architecture, Comparison) for the improvement table,
    a cell reading ``+0.034 (0.012, 0.055)``. Fraction columns are headed ``header + '10%'``: the
    rendered report passes :data:`FRACTION_HEADER` so that a heading says what the percentage is.
    """
    sub = tidy[tidy["metric"] == metric]
    if task is not None:
        sub = sub[sub["task"] == task]
    signed = "comparison" in sub.columns
    keys = ["backbone", "comparison"] if signed else ["backbone", "init", "protocol"]
    heads = {"backbone": "Architecture", "init": "Init", "protocol": "Protocol", "comparison": "Comparison"}
    fractions = sorted(sub["fraction"].unique())
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    rows = []
    for key, group in sub.groupby(keys, sort=False):
        row = {heads[k]: v for k, v in zip(keys, key, strict=True)}
        by_f = group.set_index("fraction")
        for f in fractions:
            if f in by_f.index:
                r = by_f.loc[f]
                row[header + fraction_label(f)] = f"{fmt.format(r.point)} ({r.lo:.{digits}f}, {r.hi:.{digits}f})"
            else:
                row[header + fraction_label(f)] = ""
        rows.append(row)
    return pd.DataFrame(rows, columns=[heads[k] for k in keys] + [header + fraction_label(f) for f in fractions])


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' own needs ``tabulate``, which is not a dependency)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|")
    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    sep = "|" + "|".join("---:" if _is_numeric_text(table[c]) else "---" for c in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def _is_numeric_text(column: pd.Series) -> bool:
    return bool(len(column)) and column.astype(str).str.match(r"^[+-]?\d").all()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def to_latex(table: pd.DataFrame, *, caption: str | None = None) -> str:
    """A booktabs ``tabular`` (pandas' own needs jinja2, which is not a dependency)."""
    def esc(v) -> str:
        return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(v))
    spec = "".join("r" if _is_numeric_text(table[c]) else "l" for c in table.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(esc(c) for c in table.columns) + r" \\",
             r"\midrule"]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}", r"\centering", rf"\caption{{{esc(caption)}}}", *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_") or "task"


def write_tables(out: Path, absolute: pd.DataFrame, improvement: pd.DataFrame, main_task: str,
                 tasks: Sequence[str], title: str, *, preamble: Sequence[str] = ()) -> list[Path]:
    """Write the CSVs (tidy, numeric), one LaTeX file per table and one Markdown file with them all.

    ``preamble`` lines (what the report is about: see :class:`ReportContext`) open ``report.md``.
    """
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    paths = [tables / "absolute.csv", tables / "improvement.csv"]
    absolute.to_csv(paths[0], index=False)
    improvement.to_csv(paths[1], index=False)
    names = {"auc": "AUC", "auprc": "AUPRC"}
    sections = [f"# {title}\n", *(f"- {line}" for line in preamble), ""] if preamble else [f"# {title}\n"]
    blocks = [("absolute", absolute, main_task, False), ("improvement", improvement, main_task, True)]
    blocks += [("absolute", absolute, t, False) for t in tasks if t != main_task and len(tasks) > 1]
    for kind, tidy, task, signed in blocks:
        if tidy.empty:
            continue
        for metric in METRICS:
            table = wide_table(tidy, metric, task=task, header=FRACTION_HEADER)
            if table.empty:
                continue
            treatment = str(tidy["comparison"].iloc[0]).split(" ")[0] if signed else ""
            what = f"{names[metric]} difference, {treatment} - baseline" if signed else names[metric]
            heading = f"{kind.capitalize()} {what}, task {task} (95% paired bootstrap CI)"
            sections.append(f"## {heading}\n\n{to_markdown(table)}")
            suffix = "" if task == main_task else f"_{_slug(task)}"
            tex = tables / f"{kind}_{metric}{suffix}.tex"
            tex.write_text(to_latex(table, caption=heading))
            paths.append(tex)
    md = out / "report.md"
    md.write_text("\n".join(sections))
    return [md, *paths]


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
    tables = ((f"AUC (95% CI){where}", report.absolute), (f"AUC difference, paired (95% CI){where}", report.improvement))
    text = "\n".join(f"\n{title}\n\n{to_markdown(wide_table(tidy, 'auc', header=header))}"
                     for title, tidy in tables if len(tidy))
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
    store = _check_arguments(n_replicates, groups, store, tracking_uri)
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    out = _out_folder(out)

    runs = _order(find_runs(experiment, dataset=dataset, task=task, backbone=backbone))
    check_runs(runs)
    present = check_comparison(runs, treatment, baselines)  # tags only: before any download
    predictions = load_predictions(list(runs["run_id"]), cache_dir or out / ".cache" / "predictions",
                                   workers=workers, progress=progress)
    aligned = align_predictions(predictions)
    results, skipped = bootstrap_cells(runs, aligned, n_replicates=n_replicates, seed=seed, groups=groups)
    absolute = absolute_table(runs, results)
    improvement = improvement_table(runs, results, present, treatment=treatment)
    main_task = MEAN_TASK if MEAN_TASK in results else next(iter(results))
    per_task = {t: absolute[absolute["task"] == t].reset_index(drop=True) for t in results if t != MEAN_TASK}
    context = report_context(experiment, runs, aligned.image_id, aligned.patient_id)

    settings = {"filters": {"dataset": dataset, "task": task, "backbone": backbone}, "n_replicates": n_replicates,
                "seed": seed, "groups": groups, "treatment": treatment, "baselines": baselines}
    used = runs[["run_id", "backbone", "init", "protocol", "fraction", "draw", "test_manifest_sha256"]]
    manifest = {"experiment": experiment, **settings, "n_test_images": context.n_test_images,
                "n_test_patients": context.n_test_patients, "test_source": context.test_source,
                "skipped_tasks": skipped, "runs": used.to_dict(orient="records")}
    paths = _write_report(out, absolute, improvement, main_task, list(results), manifest, context)
    report = Report(
        absolute=absolute[absolute["task"] == main_task].reset_index(drop=True),
        improvement=improvement[improvement["task"] == main_task].reset_index(drop=True),
        per_task=per_task, runs=runs, paths=paths, skipped_tasks=skipped, context=context,
    )
    if log_to_mlflow:
        report.run_id = _log_report(experiment, out, report, settings, context)
    return report


def _out_folder(out: str | os.PathLike) -> Path:
    """The report folder, created; a path naming an existing file is a ConfigError, before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"report out {str(path)!r} is an existing file, not a folder; name a folder (it is created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, a full disk
        raise ConfigError(f"cannot create the report folder {str(path)!r}: {exc}") from exc
    return path


def _check_arguments(n_replicates: int, groups: str, store: mt.Store | None, tracking_uri: str | None) -> mt.Store:
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


def _write_report(out: Path, absolute: pd.DataFrame, improvement: pd.DataFrame, main_task: str, tasks: list[str],
                  manifest: dict, context: ReportContext) -> list[Path]:
    """The tables, the plots of the main task and ``runs.json`` under ``out``; returns the paths."""
    from mococxr.report.plots import plot_curves  # matplotlib only when a report is built

    paths = write_tables(out, absolute, improvement, main_task, tasks, f"mococxr report: {context.title}",
                         preamble=context.lines())
    main = absolute[absolute["task"] == main_task]
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for metric in METRICS:
        paths.append(plot_curves(main, plots / f"{metric}.png", metric=metric, title=context.plot_title()))
    runs_json = out / "runs.json"
    runs_json.write_text(json.dumps(manifest, indent=1))
    paths.append(runs_json)
    return paths


def _log_report(experiment: str, out: Path, report: Report, settings: dict, context: ReportContext) -> str:
    """Create, or update in place, the report's MLflow run (see :mod:`mococxr.report.record`)."""
    runs = report.runs
    backbones = runs["backbone"].unique()
    run_tags = mt.tags(kind="report", dataset=context.dataset, task=context.task,
                       backbone=backbones[0] if len(backbones) == 1 else None)
    params = {"replicates": settings["n_replicates"], "seed": settings["seed"], "groups": settings["groups"],
              "treatment": settings["treatment"], "baseline": ",".join(settings["baselines"]),
              **{f"filter.{k}": v for k, v in settings["filters"].items()}}
    note = "\n\n".join([f"**Report**: {context.title}.", *context.lines(),
                         "Tables in `report.md` and `tables/`, plots in `plots/`, the runs used in `runs.json`."])
    name = f"report-{_slug(context.task)}-{context.dataset}" + ("-phantom" if context.phantom else "")
    return log_report(experiment, out, report.paths, key=report_key(experiment, settings), run_name=name,
                      run_tags=run_tags, params=params, note=note,
                      metrics=summary_metrics(context, report.absolute, report.improvement))
