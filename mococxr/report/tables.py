"""Paper-style comparison tables built from the fine-tune runs in MLflow.

A report reads MLflow and nothing else: it finds the finished fine-tune runs by their ``mococxr.*``
tags, downloads each run's per-image test predictions (cached by run id: a finished run's artifacts
never change), aligns them on ``image_id`` and runs one paired bootstrap over the shared test set.
Every cell of every table is scored on the same resamples, so a difference between two cells is a
paired difference. A cell (architecture x initialization x protocol x label fraction) pools its
draws: replicate metrics are averaged across draws before the percentiles, as MoCo-CXR does.

Comparisons that would mislead are refused rather than drawn: runs scored on different test sets
(test manifest hash or image ids differ), different labels for the same image, two runs claiming
the same cell and draw, or a table cell whose draws are missing where the other cells have them.

The report is itself an MLflow run (``mococxr.kind=report``, same experiment) holding the tables
(Markdown, CSV, LaTeX), the plots and the exact list of runs it used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from mococxr.errors import ConfigError, DataError, TrackingError
from mococxr.report.bootstrap import METRICS, BootstrapResult, bootstrap_counts, paired_bootstrap
from mococxr.tracking import mlflow as mt

PREDICTIONS_ARTIFACT = "predictions/test.parquet"
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
TREATMENT = "moco"
INIT_ORDER = ("random", "imagenet", "moco")
PROTOCOL_ORDER = ("linear", "e2e")
# (treatment protocol, baseline protocol): like for like, and the paper's "MoCo linear beats a
# fully fine-tuned baseline" comparison.
COMPARISONS = (("e2e", "e2e"), ("linear", "linear"), ("linear", "e2e"))
CELL = ["backbone", "init", "protocol", "fraction"]
MEAN_TASK = "mean"
_REQUIRED_TAGS = ("backbone", "init", "protocol", "label_fraction", "draw")


@dataclass
class Aligned:
    """Every run's test predictions on one shared, sorted list of images."""

    image_id: np.ndarray
    patient_id: np.ndarray
    tasks: list[str]
    labels: np.ndarray  # [n, tasks], NaN = masked
    scores: dict[str, np.ndarray]  # run id -> [n, tasks]


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


# --------------------------------------------------------------------------- finding runs


def find_runs(
    experiment: str,
    *,
    dataset: str | None = None,
    task: str | None = None,
    backbone: str | None = None,
) -> pd.DataFrame:
    """The finished fine-tune runs of ``experiment`` matching the filters, one row per run.

    Columns: run_id, run_name, backbone, init, protocol, dataset, task, fraction (float), draw (int),
    test_manifest_sha256, config_hash, pretrain_run_id. Raises ``TrackingError`` when the experiment
    does not exist or nothing matches, naming the experiment and the filters.
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"experiment {experiment!r} not found at {mlflow.get_tracking_uri()}")
    filters = {"kind": "finetune", "dataset": dataset, "task": task, "backbone": backbone}
    clauses = ["attributes.status = 'FINISHED'"]
    for key, value in filters.items():
        if value is None:
            continue
        if "'" in str(value):
            raise ConfigError(f"report filter {key}={value!r} must not contain a single quote")
        clauses.append(f"tags.`{mt.tag(key)}` = '{value}'")
    found, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], " and ".join(clauses), max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    if not found:
        shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None)
        raise TrackingError(f"no FINISHED runs in experiment {experiment!r} with {shown}")
    return pd.DataFrame([_run_row(r) for r in found]).sort_values(["run_id"]).reset_index(drop=True)


def _run_row(run) -> dict:
    t = run.data.tags
    rid = run.info.run_id
    missing = [k for k in _REQUIRED_TAGS if mt.tag(k) not in t]
    if missing:
        raise DataError(f"run {rid}: missing tag(s) {[mt.tag(k) for k in missing]}; was it logged by finetune?")
    try:
        fraction, draw = float(t[mt.tag("label_fraction")]), int(t[mt.tag("draw")])
    except ValueError as exc:
        raise DataError(f"run {rid}: tags {mt.tag('label_fraction')}/{mt.tag('draw')} are not numbers: {exc}") from exc
    row = {"run_id": rid, "run_name": run.info.run_name or ""}
    for key in ("backbone", "init", "protocol", "dataset", "task"):
        row[key] = t.get(mt.tag(key), "")
    row.update(fraction=fraction, draw=draw)
    for key in ("test_manifest_sha256", "config_hash", "pretrain_run_id"):
        row[key] = t.get(mt.tag(key), "")
    return row


# --------------------------------------------------------------------------- guards


def _cell_name(backbone: str, init: str, protocol: str, fraction: float) -> str:
    return f"{backbone}/{init}/{protocol}/{fraction:g}"


def _listing(runs: pd.DataFrame, limit: int = 6) -> str:
    ids = [f"{r.run_id} ({_cell_name(r.backbone, r.init, r.protocol, r.fraction)} draw {r.draw})"
           for r in runs.itertuples()]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def check_runs(runs: pd.DataFrame) -> None:
    """Refuse run sets whose table would compare unlike things (see the module docstring).

    Cheap: tags only, before any artifact is downloaded. Every message names the runs involved.
    """
    for key, flag in (("dataset", "--dataset"), ("task", "--task")):
        values = sorted(runs[key].unique())
        if len(values) > 1:
            groups = "; ".join(f"{key}={v!r}: {_listing(runs[runs[key] == v], 3)}" for v in values)
            raise DataError(f"runs mix several {key}s, which cannot share a table; pick one with {flag}. {groups}")
    shas = sorted(runs["test_manifest_sha256"].unique())
    if len(shas) > 1:
        groups = "; ".join(f"test manifest {s[:12] or '(untagged)'}: {_listing(runs[runs.test_manifest_sha256 == s], 3)}"
                           for s in shas)
        raise DataError(f"runs were scored on different test sets and cannot be compared: {groups}")

    dup = runs[runs.duplicated(CELL + ["draw"], keep=False)]
    if len(dup):
        raise DataError(
            "several finished runs claim the same cell and draw (reruns or different configs); delete or "
            f"move the unwanted ones, or filter by --backbone/--task: {_listing(dup, 10)}"
        )

    rows = runs[["backbone", "init", "protocol"]].drop_duplicates()
    problems = []
    for fraction, at_f in runs.groupby("fraction"):
        draws = set(at_f["draw"])
        for row in rows.itertuples(index=False):
            cell = at_f[(at_f.backbone == row.backbone) & (at_f.init == row.init) & (at_f.protocol == row.protocol)]
            name = _cell_name(row.backbone, row.init, row.protocol, fraction)
            if cell.empty:
                problems.append(f"{name}: no runs (other cells at fraction {fraction:g}: {_listing(at_f, 3)})")
            elif set(cell["draw"]) != draws:
                missing = sorted(draws - set(cell["draw"]))
                problems.append(f"{name}: draws {missing} missing (has {_listing(cell, 3)})")
    if problems:
        raise DataError("table cells with missing runs:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- predictions


def load_predictions(
    run_ids: Sequence[str], cache_dir: str | os.PathLike, *, workers: int = 8, progress: bool = False
) -> dict[str, pd.DataFrame]:
    """Each run's ``predictions/test.parquet`` as a DataFrame, downloaded in parallel and cached.

    The cache key is the run id alone: the report only reads FINISHED runs, whose artifacts do not
    change, so a cached file is reused as is. Files are written to a temporary name and renamed,
    so an interrupted download never leaves a truncated cache entry.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()

    def fetch(run_id: str) -> Path:
        path = cache / f"{run_id}.parquet"
        if path.is_file():
            return path
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp)
            except Exception as exc:  # MlflowException, OSError: the message names the run either way
                raise TrackingError(f"run {run_id}: cannot download {PREDICTIONS_ARTIFACT}: {exc}") from exc
            os.replace(local, path)
        return path

    with _quiet_downloads(), ThreadPoolExecutor(max_workers=max(1, min(workers, len(run_ids)))) as pool:
        jobs = pool.map(fetch, run_ids)
        paths = list(tqdm(jobs, total=len(run_ids), desc="predictions", disable=not progress, leave=False))
    return {rid: pd.read_parquet(p) for rid, p in zip(run_ids, paths, strict=True)}


@contextmanager
def _quiet_downloads():
    """MLflow draws one progress bar per downloaded file; one bar over all runs is drawn instead."""
    old = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = old


def align_predictions(predictions: Mapping[str, pd.DataFrame]) -> Aligned:
    """Put every run's predictions on the same sorted image list; refuse differing images or labels."""
    ref_id, aligned_labels, out = None, None, {}
    tasks: list[str] = []
    for rid, df in predictions.items():
        if "image_id" not in df.columns:
            raise DataError(f"run {rid}: {PREDICTIONS_ARTIFACT} has no image_id column")
        if df["image_id"].duplicated().any():
            dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
            raise DataError(f"run {rid}: {PREDICTIONS_ARTIFACT} lists image {dup!r} more than once")
        df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
        run_tasks = [c.removeprefix("label:") for c in df.columns if c.startswith("label:")]
        missing = [t for t in run_tasks if f"score:{t}" not in df.columns]
        if not run_tasks or missing:
            raise DataError(f"run {rid}: {PREDICTIONS_ARTIFACT} needs label:<task> and score:<task> columns; "
                            f"has {list(df.columns)}")
        labels = df[[f"label:{t}" for t in run_tasks]].to_numpy(np.float64)
        if ref_id is None:
            ref_id, ref, tasks, aligned_labels = rid, df, run_tasks, labels
        else:
            _check_same_test_set(ref_id, ref, tasks, aligned_labels, rid, df, run_tasks, labels)
        out[rid] = df[[f"score:{t}" for t in tasks]].to_numpy(np.float64)
    if ref_id is None:
        raise DataError("no predictions to align")
    patients = ref["patient_id"].astype(str).to_numpy() if "patient_id" in ref else ref["image_id"].to_numpy()
    return Aligned(ref["image_id"].astype(str).to_numpy(), patients, tasks, aligned_labels, out)


def _check_same_test_set(ref_id, ref, tasks, ref_labels, rid, df, run_tasks, labels) -> None:
    if run_tasks != tasks:
        raise DataError(f"runs {ref_id} and {rid} predict different tasks: {tasks} vs {run_tasks}")
    a, b = ref["image_id"].to_numpy(), df["image_id"].to_numpy()
    if a.shape != b.shape or not (a == b).all():
        only_ref, only_run = np.setdiff1d(a, b), np.setdiff1d(b, a)
        raise DataError(
            f"runs {ref_id} and {rid} were scored on different test images ({len(only_ref)} only in the "
            f"first, e.g. {list(only_ref[:3])}; {len(only_run)} only in the second, e.g. {list(only_run[:3])})"
        )
    same = (ref_labels == labels) | (np.isnan(ref_labels) & np.isnan(labels))
    if not same.all():
        i, j = np.argwhere(~same)[0]
        raise DataError(f"runs {ref_id} and {rid} disagree on label:{tasks[j]} of image {a[i]!r} "
                        f"({ref_labels[i, j]} vs {labels[i, j]}): different label policy or data?")


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
    cells = {_cell_name(*key): list(cell["run_id"]) for key, cell in _order(runs).groupby(CELL, sort=False)}
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
            name = _cell_name(*key)
            for metric in res.metrics:
                iv = res.interval(name, metric)
                rows.append({"task": task, **dict(zip(CELL, key, strict=True)), "metric": metric,
                             "point": iv.point, "lo": iv.lo, "hi": iv.hi, "n_draws": len(cell),
                             "n_replicates": res.n_replicates, "n_single_class": res.n_single_class,
                             "run_ids": " ".join(cell["run_id"])})
    return pd.DataFrame(rows)


def improvement_table(
    runs: pd.DataFrame, results: Mapping[str, BootstrapResult], baselines: Sequence[str]
) -> pd.DataFrame:
    """Tidy table of paired differences ``moco - baseline`` on the same replicates.

    For every architecture, fraction and baseline init present: e2e vs e2e, linear vs linear and
    linear (MoCo) vs e2e (baseline). Empty when there are no MoCo runs or no baseline.
    """
    present = set(map(tuple, runs[CELL].drop_duplicates().to_numpy().tolist()))
    rows = []
    for task, res in results.items():
        for backbone in _order(runs)["backbone"].unique():
            for base in baselines:
                for pa, pb in COMPARISONS:
                    for fraction in sorted(runs["fraction"].unique()):
                        a, b = (backbone, TREATMENT, pa, fraction), (backbone, base, pb, fraction)
                        if a not in present or b not in present:
                            continue
                        for metric in res.metrics:
                            d = res.diff(_cell_name(*a), _cell_name(*b), metric)
                            rows.append({"task": task, "backbone": backbone,
                                         "comparison": f"{TREATMENT} {pa} - {base} {pb}",
                                         "baseline": base, "protocol_a": pa, "protocol_b": pb,
                                         "fraction": fraction, "metric": metric, "point": d.point,
                                         "lo": d.lo, "hi": d.hi, "frac_greater": d.frac_greater})
    columns = ["task", "backbone", "comparison", "baseline", "protocol_a", "protocol_b", "fraction",
               "metric", "point", "lo", "hi", "frac_greater"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- rendering


def fraction_label(fraction: float) -> str:
    """0.001 -> '0.1%', 0.01 -> '1%', 1.0 -> '100%' (the paper's column headings)."""
    return f"{round(100 * fraction, 6):g}%"


def wide_table(tidy: pd.DataFrame, metric: str = "auc", *, task: str | None = None, digits: int = 3) -> pd.DataFrame:
    """A paper-style table of strings: rows = cells (or comparisons), columns = label fractions.

    Works on either tidy table: rows are (Architecture, Init, Protocol) for the absolute table, a
    cell reading ``0.812 (0.790, 0.833)``, and (Architecture, Comparison) for the improvement table,
    a cell reading ``+0.034 (0.012, 0.055)``.
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
                row[fraction_label(f)] = f"{fmt.format(r.point)} ({r.lo:.{digits}f}, {r.hi:.{digits}f})"
            else:
                row[fraction_label(f)] = ""
        rows.append(row)
    return pd.DataFrame(rows, columns=[heads[k] for k in keys] + [fraction_label(f) for f in fractions])


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
                 tasks: Sequence[str], title: str) -> list[Path]:
    """Write the CSVs (tidy, numeric), one LaTeX file per table and one Markdown file with them all."""
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    paths = [tables / "absolute.csv", tables / "improvement.csv"]
    absolute.to_csv(paths[0], index=False)
    improvement.to_csv(paths[1], index=False)
    names = {"auc": "AUC", "auprc": "AUPRC"}
    sections = [f"# {title}\n"]
    blocks = [("absolute", absolute, main_task, False), ("improvement", improvement, main_task, True)]
    blocks += [("absolute", absolute, t, False) for t in tasks if t != main_task and len(tasks) > 1]
    for kind, tidy, task, signed in blocks:
        if tidy.empty:
            continue
        for metric in METRICS:
            table = wide_table(tidy, metric, task=task)
            if table.empty:
                continue
            what = f"{names[metric]} difference, MoCo - baseline" if signed else names[metric]
            heading = f"{kind.capitalize()} {what}, task {task} (95% paired bootstrap CI)"
            sections.append(f"## {heading}\n\n{to_markdown(table)}")
            suffix = "" if task == main_task else f"_{_slug(task)}"
            tex = tables / f"{kind}_{metric}{suffix}.tex"
            tex.write_text(to_latex(table, caption=heading))
            paths.append(tex)
    md = out / "report.md"
    md.write_text("\n".join(sections))
    return [md, *paths]


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
    baseline: str | Sequence[str] = ("random", "imagenet"),
    log_to_mlflow: bool = True,
    cache_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    workers: int = 8,
    progress: bool = True,
) -> Report:
    """Find the fine-tune runs, bootstrap them together, write and log tables and plots.

    ``baseline`` names the init(s) MoCo is compared against in the improvement table (those present
    are used). ``groups="patient"`` resamples patients instead of images. Predictions are cached
    under ``cache_dir`` (default ``out/.cache/predictions``). With ``log_to_mlflow`` the report is a
    run of kind ``report`` in ``experiment`` holding every file written and ``runs.json``.
    """
    from mococxr.report.plots import plot_curves  # matplotlib only when a report is built

    if n_replicates < 1:
        raise ConfigError(f"n_replicates must be >= 1, got {n_replicates}")
    if groups not in ("image", "patient"):
        raise ConfigError(f"groups must be 'image' or 'patient', got {groups!r}")
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    mt.configure(tracking_uri)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    runs = _order(find_runs(experiment, dataset=dataset, task=task, backbone=backbone))
    check_runs(runs)
    predictions = load_predictions(list(runs["run_id"]), cache_dir or out / ".cache" / "predictions",
                                   workers=workers, progress=progress)
    aligned = align_predictions(predictions)
    results, skipped = bootstrap_cells(runs, aligned, n_replicates=n_replicates, seed=seed, groups=groups)
    present = [b for b in baselines if b in set(runs["init"]) and b != TREATMENT]
    absolute = absolute_table(runs, results)
    improvement = improvement_table(runs, results, present)
    main_task = MEAN_TASK if MEAN_TASK in results else next(iter(results))
    per_task = {t: absolute[absolute["task"] == t].reset_index(drop=True) for t in results if t != MEAN_TASK}

    title = f"mococxr report: experiment {experiment}, task {runs['task'].iloc[0]}, dataset {runs['dataset'].iloc[0]}"
    paths = write_tables(out, absolute, improvement, main_task, list(results), title)
    main = absolute[absolute["task"] == main_task]
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for metric in METRICS:
        paths.append(plot_curves(main, plots / f"{metric}.png", metric=metric))
    used = runs[["run_id", "backbone", "init", "protocol", "fraction", "draw", "test_manifest_sha256"]]
    manifest = {"experiment": experiment, "filters": {"dataset": dataset, "task": task, "backbone": backbone},
                "n_replicates": n_replicates, "seed": seed, "groups": groups, "n_test_images": int(aligned.image_id.size),
                "skipped_tasks": skipped, "runs": used.to_dict(orient="records")}
    runs_json = out / "runs.json"
    runs_json.write_text(json.dumps(manifest, indent=1))
    paths.append(runs_json)

    report = Report(
        absolute=absolute[absolute["task"] == main_task].reset_index(drop=True),
        improvement=improvement[improvement["task"] == main_task].reset_index(drop=True),
        per_task=per_task, runs=runs, paths=paths, skipped_tasks=skipped,
    )
    if log_to_mlflow:
        backbones = runs["backbone"].unique()
        run_tags = mt.tags(kind="report", dataset=runs["dataset"].iloc[0], task=runs["task"].iloc[0],
                           backbone=backbones[0] if len(backbones) == 1 else None)
        report.run_id = _log_report(experiment, out, paths, manifest, run_tags, baselines)
    return report


def _log_report(experiment, out: Path, paths, manifest, run_tags, baselines) -> str:
    with mt.start_run(experiment, run_name="report", run_tags=run_tags) as run:
        mlflow.log_params({"replicates": manifest["n_replicates"], "seed": manifest["seed"],
                           "groups": manifest["groups"], "baseline": ",".join(baselines),
                           "n_runs": len(manifest["runs"]), "n_test_images": manifest["n_test_images"]})
        with tempfile.TemporaryDirectory() as tmp:  # one upload of the whole tree, without the cache
            for path in paths:
                dest = Path(tmp) / path.relative_to(out)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            mlflow.log_artifacts(tmp)
        return run.info.run_id
