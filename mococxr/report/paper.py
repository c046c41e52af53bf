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
holds ``report.html`` (every table, figure and caption on one page, the file to open in the MLflow UI),
``report.md`` (the same as Markdown) and ``runs.json`` (the fine-tune runs used).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mococxr.report import published as pub
from mococxr.report.describe import summary_metrics
from mococxr.report.paper_captions import comparison_for, protocol_lines, published_lines
from mococxr.report.paper_competition import competition_family
from mococxr.report.paper_figures import figure_item
from mococxr.report.paper_notes import PaperNotes, Table2Row
from mococxr.report.paper_publish import Item, _publish, _table_item
from mococxr.report.paper_runs import _Family, _gather
from mococxr.report.paper_table2 import table2_report
from mococxr.report.paper_tables import TREATMENT, absolute_layout, baseline_heading, improvement_layout
from mococxr.report.tables import _out_folder
from mococxr.tracking import mlflow as mt

__all__ = [
    "PaperNotes",
    "Table2Row",
    "chexpert_family",
    "competition_family",
    "shenzhen_family",
    "table2_report",
]


# --------------------------------------------------------------------------- the families


def chexpert_family(
    experiment: str,
    *,
    notes: PaperNotes,
    out: str | os.PathLike,
    n_replicates: int = 500,
    task: str | None = None,
    seed: int = 0,
    store: mt.Store | None = None,
) -> str:
    """Table 1, appendix Table 1, Figures 3-4 and appendix Figure 3 from a CheXpert pleural effusion grid.

    Returns the id of the ``paper-chexpert`` report run in ``experiment``.
    """
    return _two_protocol_family(
        experiment,
        "paper-chexpert",
        notes=notes,
        out=out,
        n_replicates=n_replicates,
        seed=seed,
        store=store,
        task=task,
        improvement=("table1", "Table 1", pub.TABLE1),
        absolute=("appendix_table1", "Appendix Table 1", pub.APPENDIX_TABLE1),
        figures=(
            ("figure3", "Figure 3", "auc", ("linear",)),
            ("figure4", "Figure 4", "auc", ("e2e",)),
            ("appendix_figure3", "Appendix Figure 3", "auprc", ("linear", "e2e")),
        ),
        paper_fractions=pub.CHEXPERT_FRACTIONS,
        paper_epochs=pub.PAPER_EPOCHS,
    )


def shenzhen_family(
    experiment: str,
    *,
    notes: PaperNotes,
    out: str | os.PathLike,
    n_replicates: int = 500,
    task: str | None = None,
    seed: int = 0,
    store: mt.Store | None = None,
) -> str:
    """Appendix Tables 2-3, Figure 5 and appendix Figure 4 from a Shenzhen tuberculosis grid.

    Returns the id of the ``paper-shenzhen`` report run in ``experiment``.
    """
    return _two_protocol_family(
        experiment,
        "paper-shenzhen",
        notes=notes,
        out=out,
        n_replicates=n_replicates,
        seed=seed,
        store=store,
        task=task,
        improvement=("appendix_table3", "Appendix Table 3", pub.APPENDIX_TABLE3),
        absolute=("appendix_table2", "Appendix Table 2", pub.APPENDIX_TABLE2),
        figures=(
            ("figure5", "Figure 5", "auc", ("linear", "e2e")),
            ("appendix_figure4", "Appendix Figure 4", "auprc", ("linear", "e2e")),
        ),
        paper_fractions=pub.SHENZHEN_FRACTIONS,
        paper_epochs=None,
    )


def _two_protocol_family(
    experiment,
    name,
    *,
    notes,
    out,
    n_replicates,
    seed,
    store,
    improvement,
    absolute,
    figures,
    paper_fractions,
    paper_epochs,
    task=None,
) -> str:
    started = time.monotonic()
    out = _out_folder(out)
    fam = _gather(
        experiment,
        name,
        out=out,
        notes=notes,
        n_replicates=n_replicates,
        seed=seed,
        store=store,
        inits=[TREATMENT, notes.baseline],
        protocols=["linear", "e2e"],
        task=task,
    )
    r, ctx = fam.report, fam.report.context
    lines = protocol_lines(
        ctx, fam.params, r.absolute, notes, n_replicates=n_replicates, paper_epochs=paper_epochs
    )
    items = _two_tables(out, fam, notes, lines, improvement, absolute, paper_fractions)
    items += _figures(out, fam, notes, lines, figures, absolute)
    settings = {
        "paper": name,
        "n_replicates": n_replicates,
        "seed": seed,
        "baseline": notes.baseline,
        "moco_start": notes.moco_start,
        "task": task,
    }
    return _publish(
        experiment,
        out,
        name,
        items,
        lines,
        [fam],
        settings,
        notes,
        title=f"{name}: {ctx.title}",
        metrics=summary_metrics(ctx, r.absolute, r.improvement),
        started=started,
    )


def _two_tables(
    out: Path,
    fam: _Family,
    notes: PaperNotes,
    lines: list[str],
    improvement: tuple,
    absolute: tuple,
    paper_fractions,
) -> list[Item]:
    """The family's improvement table and absolute table, each beside the published one."""
    r, ctx = fam.report, fam.report.context
    base = baseline_heading(notes.baseline)
    (istem, iname, itable), (astem, aname, atable) = improvement, absolute
    icmp, acmp = comparison_for(notes, phantom=ctx.phantom), comparison_for(notes, phantom=ctx.phantom)
    itab = improvement_layout(r.improvement, notes.baseline, itable, paper_fractions, icmp)
    atab = absolute_layout(r.absolute, notes.baseline, atable, paper_fractions, comparison=acmp)
    return [
        _table_item(
            out,
            istem,
            f"{iname}. AUC improvement of MoCo-CXR-pretrained over {base} models, task "
            f"{ctx.task}: paired differences (95% CI).",
            itab,
            lines,
            published_lines(iname, notes, phantom=ctx.phantom, comparison=icmp),
        ),
        _table_item(
            out,
            astem,
            f"{aname}. AUC of MoCo-CXR-pretrained and {base} models, task {ctx.task} (95% CI).",
            atab,
            lines,
            published_lines(aname, notes, phantom=ctx.phantom, comparison=acmp),
        ),
    ]


def _figures(
    out: Path, fam: _Family, notes: PaperNotes, lines: list[str], figures: tuple, absolute: tuple
) -> list[Item]:
    """The family's figures: a metric against label fraction per protocol, the published points on AUC."""
    r, ctx = fam.report, fam.report.context
    _, aname, atable = absolute
    items = []
    for stem, title, metric, protocols in figures:
        items.append(
            figure_item(
                out,
                stem,
                title,
                r.absolute,
                metric=metric,
                protocols=protocols,
                inits=(TREATMENT, notes.baseline),
                lines=lines,
                notes=notes,
                published=atable if metric == "auc" else None,
                phantom=ctx.phantom,
                source=aname,
            )
        )
    return items
