"""The paper's tables and figures, each family of them one report run in MLflow.

A family reads the fine-tune runs of one experiment through :func:`mococxr.report.tables.build_report`
(the same run finding, checks and paired bootstrap as every report), lays the numbers out as the paper
did (:mod:`mococxr.report.paper_tables`) beside the published ones (:mod:`mococxr.report.published`),
and logs them as one report run (``mococxr.kind=report``) named after the family and updated in place
when the family is made again (:func:`mococxr.report.record.log_report`):

- :func:`chexpert_family` (``paper-chexpert``): Table 1, appendix Table 1, Figures 3-4, appendix Figure 3.
- :func:`shenzhen_family` (``paper-shenzhen``): appendix Tables 2-3, Figure 5, appendix Figure 4.
- :func:`table2_report` (``paper-table2``): Table 2, one row per MoCo pretraining learning rate.
- :func:`competition_family` (``paper-competition``): appendix Tables 4-5, one bootstrap per task.

Every artifact is named after its paper item (``table1.md`` / ``table1.csv``, ``figure3.png``), every
caption names how this protocol differs from the paper's (see :class:`PaperNotes`), and each run also
holds ``report.md`` (all tables and captions) and ``runs.json`` (the fine-tune runs used).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mococxr.errors import ConfigError, DataError, TrackingError
from mococxr.report import published as pub
from mococxr.report.describe import summary_metrics
from mococxr.report.paper_captions import caption_markdown, comparison_for, protocol_lines, published_lines
from mococxr.report.paper_figures import figure_item
from mococxr.report.paper_params import caption_params
from mococxr.report.paper_tables import (
    TREATMENT,
    absolute_layout,
    arch,
    baseline_heading,
    competition_layout,
    improvement_layout,
    table2_layout,
)
from mococxr.report.record import log_report, report_key
from mococxr.report.runs import find_runs
from mococxr.report.tables import Report, _out_folder, build_report, to_markdown
from mococxr.tracking import mlflow as mt

__all__ = ["PaperNotes", "Table2Row", "chexpert_family", "competition_family", "shenzhen_family", "table2_report"]


@dataclass(frozen=True)
class PaperNotes:
    """What every caption must say beside the runs' own facts."""

    baseline: str  # grid label of the baseline init: "imagenet" or "random"
    moco_start: str  # what MoCo pretraining started from: "imagenet" or "random"
    extra: tuple[str, ...] = ()  # further protocol lines from the plan

    def __post_init__(self):
        for name in ("baseline", "moco_start"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"PaperNotes.{name} must name an init (e.g. 'imagenet' or 'random'), "
                                  f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Table2Row:
    """One MoCo pretraining trial of Table 2 and the init label its fine-tune runs carry."""

    label: str  # the init label of this row's fine-tune run(s) in the table-2 experiment
    lr: float  # pretraining learning rate of the trial
    scheduler: str
    trial: int  # Optuna trial number
    pretrain_run_id: str  # the trial's MLflow pretraining run
    registered_model: str
    version: str
    epoch: int  # the checkpoint epoch
    val_objective: float | None = None  # the trial's validation objective (val/linear_auc of its selected epoch)


@dataclass
class _Family:
    """One experiment's (or task's) report, and the params of its runs the captions read."""

    report: Report
    params: pd.DataFrame


# --------------------------------------------------------------------------- the families


def chexpert_family(experiment: str, *, notes: PaperNotes, out: str | os.PathLike, n_replicates: int = 500,
                    task: str | None = None,
                    seed: int = 0, store: mt.Store | None = None) -> str:
    """Table 1, appendix Table 1, Figures 3-4 and appendix Figure 3 from a CheXpert pleural effusion grid.

    Returns the id of the ``paper-chexpert`` report run in ``experiment``.
    """
    return _two_protocol_family(
        experiment, "paper-chexpert", notes=notes, out=out, n_replicates=n_replicates, seed=seed, store=store, task=task,
        improvement=("table1", "Table 1", pub.TABLE1), absolute=("appendix_table1", "Appendix Table 1",
                                                                 pub.APPENDIX_TABLE1),
        figures=(("figure3", "Figure 3", "auc", ("linear",)), ("figure4", "Figure 4", "auc", ("e2e",)),
                 ("appendix_figure3", "Appendix Figure 3", "auprc", ("linear", "e2e"))),
        paper_fractions=pub.CHEXPERT_FRACTIONS, paper_epochs=pub.PAPER_EPOCHS)


def shenzhen_family(experiment: str, *, notes: PaperNotes, out: str | os.PathLike, n_replicates: int = 500,
                    task: str | None = None,
                    seed: int = 0, store: mt.Store | None = None) -> str:
    """Appendix Tables 2-3, Figure 5 and appendix Figure 4 from a Shenzhen tuberculosis grid.

    Returns the id of the ``paper-shenzhen`` report run in ``experiment``.
    """
    return _two_protocol_family(
        experiment, "paper-shenzhen", notes=notes, out=out, n_replicates=n_replicates, seed=seed, store=store, task=task,
        improvement=("appendix_table3", "Appendix Table 3", pub.APPENDIX_TABLE3),
        absolute=("appendix_table2", "Appendix Table 2", pub.APPENDIX_TABLE2),
        figures=(("figure5", "Figure 5", "auc", ("linear", "e2e")),
                 ("appendix_figure4", "Appendix Figure 4", "auprc", ("linear", "e2e"))),
        paper_fractions=pub.SHENZHEN_FRACTIONS, paper_epochs=None)


def _two_protocol_family(experiment, name, *, notes, out, n_replicates, seed, store, improvement, absolute,
                         figures, paper_fractions, paper_epochs, task=None) -> str:
    out = _out_folder(out)
    fam = _gather(experiment, name, out=out, notes=notes, n_replicates=n_replicates, seed=seed, store=store,
                  inits=[TREATMENT, notes.baseline], protocols=["linear", "e2e"], task=task)
    r, ctx = fam.report, fam.report.context
    lines = protocol_lines(ctx, fam.params, r.absolute, notes, n_replicates=n_replicates, paper_epochs=paper_epochs)
    base = baseline_heading(notes.baseline)
    (istem, iname, itable), (astem, aname, atable) = improvement, absolute
    icmp, acmp = comparison_for(notes, phantom=ctx.phantom), comparison_for(notes, phantom=ctx.phantom)
    itab = improvement_layout(r.improvement, notes.baseline, itable, paper_fractions, icmp)
    atab = absolute_layout(r.absolute, notes.baseline, atable, paper_fractions, comparison=acmp)
    items = [
        _table_item(out, istem, f"{iname}. AUC improvement of MoCo-CXR-pretrained over {base} models, task "
                    f"{ctx.task}: paired differences (95% CI).", itab,
                    lines, published_lines(iname, notes, phantom=ctx.phantom, comparison=icmp)),
        _table_item(out, astem, f"{aname}. AUC of MoCo-CXR-pretrained and {base} models, task {ctx.task} (95% CI).",
                    atab, lines, published_lines(aname, notes, phantom=ctx.phantom, comparison=acmp)),
    ]
    for stem, title, metric, protocols in figures:
        items.append(figure_item(out, stem, title, r.absolute, metric=metric, protocols=protocols,
                                 inits=(TREATMENT, notes.baseline), lines=lines, notes=notes,
                                 published=atable if metric == "auc" else None, phantom=ctx.phantom,
                                 source=aname))
    settings = {"paper": name, "n_replicates": n_replicates, "seed": seed, "baseline": notes.baseline,
                "moco_start": notes.moco_start, "task": task}
    return _publish(experiment, out, name, items, lines, [fam], settings, notes,
                    title=f"{name}: {ctx.title}",
                    metrics=summary_metrics(ctx, r.absolute, r.improvement))


def competition_family(experiment: str, tasks: Sequence[str], *, notes: PaperNotes, out: str | os.PathLike,
                       n_replicates: int = 500, seed: int = 0, store: mt.Store | None = None,
                       backbone: str | None = None) -> str:
    """Appendix Tables 4 (linear) and 5 (end-to-end): per CheXpert task, baseline, MoCo-CXR and improvement.

    ``tasks`` are the ``mococxr.task`` tags of the runs (one CheXpert column each); each task is its own
    paired bootstrap. ``backbone`` keeps that backbone's runs only (the paper's are ResNet18; the
    experiment may also hold other backbones' pleural-effusion runs). Returns the id of the
    ``paper-competition`` report run in ``experiment``.
    """
    if not tasks:
        raise ConfigError("competition_family: no tasks given")
    out = _out_folder(out)
    families = {t: _gather(experiment, "paper-competition", out=out, notes=notes, n_replicates=n_replicates,
                           seed=seed, store=store, task=t, inits=[TREATMENT, notes.baseline],
                           protocols=["linear", "e2e"], backbone=backbone) for t in tasks}
    per_task = [protocol_lines(f.report.context, f.params, f.report.absolute, notes, n_replicates=n_replicates,
                               paper_epochs=pub.PAPER_EPOCHS) for f in families.values()]
    lines = _merge_lines(list(families), per_task)
    phantom = any(f.report.context.phantom for f in families.values())
    tables = {t: (f.report.absolute, f.report.improvement) for t, f in families.items()}
    items = []
    for stem, item, protocol, what in (("appendix_table4", "Appendix Table 4", "linear", "linear"),
                                       ("appendix_table5", "Appendix Table 5", "e2e", "end-to-end")):
        cmp = comparison_for(notes, phantom=phantom)
        items.append(_table_item(
            out, stem, f"{item}. AUC of {what} models on the CheXpert competition tasks: baseline "
                       f"({baseline_heading(notes.baseline)}), MoCo-CXR and their paired difference (95% CI).",
            competition_layout(tables, notes.baseline, protocol, cmp), lines,
            published_lines(item, notes, phantom=phantom, comparison=cmp, tasks=list(tasks))))
    metrics = {f"{_key(t)}/{k}": v for t, f in families.items()
               for k, v in summary_metrics(f.report.context, f.report.absolute, f.report.improvement).items()}
    settings = {"paper": "paper-competition", "n_replicates": n_replicates, "seed": seed, "baseline": notes.baseline,
                "moco_start": notes.moco_start, "tasks": list(tasks), "backbone": backbone}
    return _publish(experiment, out, "paper-competition", items, lines, list(families.values()), settings, notes,
                    title=f"paper-competition: tasks {', '.join(tasks)}", metrics=metrics)


def table2_report(experiment: str, rows: Sequence[Table2Row], *, notes: PaperNotes, out: str | os.PathLike,
                  n_replicates: int = 500, seed: int = 0, store: mt.Store | None = None) -> str:
    """Table 2: the AUC of a linear fine-tune at 100% labels per pretraining learning rate, linked to its trial.

    Each row's init ``label`` names its fine-tune runs in ``experiment``; the row's pretraining run must
    exist (its experiment id makes the link) and match the runs' ``mococxr.pretrain_run_id``. Of the rows
    sharing a learning rate (one per scheduler), ``table2.md`` shows the one with the best validation score
    (its ``val_objective``, else its runs' ``best/val_auc``); ``table2.csv`` and ``table2.json`` keep them
    all, with ``chosen``. Returns the id of the ``paper-table2`` report run in ``experiment``.
    """
    if not rows:
        raise ConfigError("table2_report: no rows given")
    out = _out_folder(out)
    fam = _gather(experiment, "paper-table2", out=out, notes=notes, n_replicates=n_replicates, seed=seed,
                  store=store, treatment=None, inits=sorted({r.label for r in rows}), protocols=["linear"])
    ctx = fam.report.context
    links = {r.pretrain_run_id: _run_link(r.pretrain_run_id, r.label) for r in rows}
    cmp = comparison_for(notes, phantom=ctx.phantom, baseline=False)
    table, records, choice = table2_layout(fam.report.absolute, fam.report.runs, fam.params, rows, links,
                                           experiment=experiment, comparison=cmp)
    epochs = pub.PAPER_EPOCHS if ctx.dataset == "chexpert" else None
    lines = protocol_lines(ctx, fam.params, fam.report.absolute, notes, n_replicates=n_replicates,
                           paper_epochs=epochs, baseline=False)
    backbones = sorted({r["backbone"] for r in records})
    md = table.assign(**{"pretraining run": [f"[{i}]({link})" for i, link in zip(table["pretraining run"],
                                                                                   table["link"], strict=True)]})
    own = [choice, *published_lines("Table 2", notes, phantom=ctx.phantom, baseline=False, comparison=cmp)]
    items = [_table_item(out, "table2", f"Table 2. AUC of {', '.join(map(arch, backbones))} linear models fine-tuned "
                         f"on 100% of the labels from the MoCo checkpoint of each pretraining learning rate (95% CI).",
                         table, lines, own, markdown=md[md["chosen"]].drop(columns=["link", "chosen"]))]
    rows_json = out / "table2.json"
    rows_json.write_text(json.dumps({"experiment": experiment, "rows": records}, indent=1))
    items.append(([rows_json], ""))
    metrics = {f"table2/auc_lr{r['lr']:g}_{r['scheduler']}": r["auc"] for r in records}
    metrics |= {f"table2/auc_lr{r['lr']:g}": r["auc"] for r in records if r["chosen"]}
    settings = {"paper": "paper-table2", "n_replicates": n_replicates, "seed": seed,
                "labels": sorted({r.label for r in rows})}
    return _publish(experiment, out, "paper-table2", items, lines, [fam], settings, notes,
                    title=f"paper-table2: {ctx.title}", metrics=metrics)


# --------------------------------------------------------------------------- runs and params


def _gather(experiment: str, name: str, *, out: Path, notes: PaperNotes, n_replicates: int, seed: int,
            store: mt.Store | None, inits: Sequence[str], protocols: Sequence[str], task: str | None = None,
            treatment: str | None = TREATMENT, backbone: str | None = None) -> _Family:
    """The report over ``experiment``'s runs (of ``task``), after checking the inits and protocols it needs."""
    mt.current_store(store)
    where = f"experiment {experiment!r}" + (f" (task {task!r})" if task else "")
    try:
        runs = find_runs(experiment, task=task, backbone=backbone)
    except TrackingError as exc:
        raise DataError(f"{name}: {exc}; run the fine-tune grid into it first") from None
    for column, needed in (("init", inits), ("protocol", protocols)):
        missing = [v for v in needed if v not in set(runs[column])]
        if missing:
            raise DataError(f"{name}: {where} has no finished fine-tune runs of {column} {missing} "
                            f"(it has {sorted(set(runs[column]))})")
    build = out / ".build" / (name + (f"-{_key(task)}" if task else ""))
    report = build_report(experiment, out=build, task=task, backbone=backbone, n_replicates=n_replicates, seed=seed,
                          treatment=treatment, baseline=notes.baseline, log_to_mlflow=False,
                          cache_dir=out / ".cache" / "predictions", store=store, progress=False)
    return _Family(report, caption_params(experiment, report.runs))


def _run_link(run_id: str, label: str) -> str:
    """The MLflow UI's address of a run, relative to the UI's root: ``#/experiments/<id>/runs/<run id>``."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise DataError(f"paper-table2: row {label!r} names pretraining run {run_id!r}, which is not in the "
                        f"store ({str(exc).splitlines()[0]})") from None
    return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"


# --------------------------------------------------------------------------- writing and logging


def _key(text: str) -> str:
    """A task as a metric-name segment and a folder name."""
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in str(text))


def _table_item(out: Path, stem: str, heading: str, table: pd.DataFrame, lines: Sequence[str], own: Sequence[str],
                *, markdown: pd.DataFrame | None = None) -> tuple[list[Path], str]:
    """``<stem>.md`` (heading, caption, table) and ``<stem>.csv``; returns the paths and the report.md section.

    The caption is the family's ``lines`` and the item's ``own``; ``report.md`` says the family's lines
    once, so its section holds only the item's own.
    """
    body = to_markdown(markdown if markdown is not None else table)
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(f"# {heading}\n\n{caption_markdown([*lines, *own])}\n\n{body}")
    table.to_csv(csv, index=False)
    return [md, csv], f"## {heading}\n\n{caption_markdown(own)}\n\n{body}"


def _merge_lines(tasks: Sequence[str], per_task: Sequence[Sequence[str]]) -> list[str]:
    """Caption lines of several tasks: a line all share once, a line that differs once per task, prefixed."""
    common = [line for line in per_task[0] if all(line in lines for lines in per_task[1:])]
    own = [f"{task}: {line}" for task, lines in zip(tasks, per_task, strict=True) for line in lines
           if line not in common]
    return common + own


def _publish(experiment: str, out: Path, name: str, items, lines: Sequence[str], families: Sequence[_Family],
             settings: dict, notes: PaperNotes, *, title: str, metrics: dict[str, float]) -> str:
    """Write ``report.md`` and ``runs.json`` beside the items and log them all as the family's report run."""
    paths = [p for item_paths, _ in items for p in item_paths]
    preamble = f"# {title}\n\nWhat every table and figure below rests on:\n\n{caption_markdown(lines)}\n"
    (out / "report.md").write_text("\n".join([preamble, *(s for _, s in items if s)]))
    runs = pd.concat([f.report.runs for f in families], ignore_index=True)
    used = runs[["run_id", "backbone", "init", "protocol", "task", "fraction", "draw", "test_manifest_sha256"]]
    (out / "runs.json").write_text(json.dumps({"experiment": experiment, **settings, "notes": asdict(notes),
                                               "runs": used.to_dict(orient="records")}, indent=1))
    paths += [out / "report.md", out / "runs.json"]
    listing = "\n".join(f"- `{p.name}`" for p in paths)
    note = "\n\n".join([f"**Paper report** {title}.", "Items:\n" + listing, caption_markdown(lines)])
    ctx = families[0].report.context
    tasks = sorted({f.report.context.task for f in families})
    run_tags = mt.tags(kind="report", dataset=ctx.dataset, task=tasks[0] if len(tasks) == 1 else None)
    params = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in settings.items()}
    return log_report(experiment, out, paths, key=report_key(experiment, settings), run_name=name,
                      run_tags=run_tags, params=params, metrics=metrics, note=note)
