"""The ``paper-competition`` family: appendix Tables 4 (linear) and 5 (end-to-end), the CheXpert
competition tasks, one paired bootstrap per task (:func:`competition_family`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from mococxr.errors import ConfigError
from mococxr.report import published as pub
from mococxr.report.describe import summary_metrics
from mococxr.report.paper_captions import comparison_for, protocol_lines, published_lines
from mococxr.report.paper_notes import PaperNotes
from mococxr.report.paper_publish import Item, _merge_lines, _publish, _table_item
from mococxr.report.paper_runs import _Family, _gather, _key
from mococxr.report.paper_tables import TREATMENT, baseline_heading, competition_layout
from mococxr.report.tables import _out_folder
from mococxr.tracking import mlflow as mt


def competition_family(
    experiment: str,
    tasks: Sequence[str],
    *,
    notes: PaperNotes,
    out: str | os.PathLike,
    n_replicates: int = 500,
    seed: int = 0,
    store: mt.Store | None = None,
    backbone: str | None = None,
) -> str:
    """Appendix Tables 4 (linear) and 5 (end-to-end): per CheXpert task, baseline, MoCo-CXR and
    improvement.

    ``tasks`` are the ``mococxr.task`` tags of the runs (one CheXpert column each); each task is its own
    paired bootstrap. ``backbone`` keeps that backbone's runs only (the paper's are ResNet18; the
    experiment may also hold other backbones' pleural-effusion runs). Returns the id of the
    ``paper-competition`` report run in ``experiment``.
    """
    if not tasks:
        raise ConfigError("competition_family: no tasks given")
    started = time.monotonic()
    out = _out_folder(out)
    families, lines = _task_families(experiment, tasks, out, notes, n_replicates, seed, store, backbone)
    phantom = any(f.report.context.phantom for f in families.values())
    tables = {t: (f.report.absolute, f.report.improvement) for t, f in families.items()}
    items = _competition_items(out, tables, notes, lines, phantom, tasks)
    metrics = {
        f"{_key(t)}/{k}": v
        for t, f in families.items()
        for k, v in summary_metrics(f.report.context, f.report.absolute, f.report.improvement).items()
    }
    settings = {
        "paper": "paper-competition",
        "n_replicates": n_replicates,
        "seed": seed,
        "baseline": notes.baseline,
        "moco_start": notes.moco_start,
        "tasks": list(tasks),
        "backbone": backbone,
    }
    return _publish(
        experiment,
        out,
        "paper-competition",
        items,
        lines,
        list(families.values()),
        settings,
        notes,
        title=f"paper-competition: tasks {', '.join(tasks)}",
        metrics=metrics,
        started=started,
    )


def _task_families(
    experiment: str,
    tasks: Sequence[str],
    out: Path,
    notes: PaperNotes,
    n_replicates: int,
    seed: int,
    store: mt.Store | None,
    backbone: str | None,
) -> tuple[dict[str, _Family], list[str]]:
    """Each task's report, and the caption lines of them all (a line they share once, a line that
    differs once per task)."""
    families = {
        t: _gather(
            experiment,
            "paper-competition",
            out=out,
            notes=notes,
            n_replicates=n_replicates,
            seed=seed,
            store=store,
            task=t,
            inits=[TREATMENT, notes.baseline],
            protocols=["linear", "e2e"],
            backbone=backbone,
        )
        for t in tasks
    }
    per_task = [
        protocol_lines(
            f.report.context,
            f.params,
            f.report.absolute,
            notes,
            n_replicates=n_replicates,
            paper_epochs=pub.PAPER_EPOCHS,
        )
        for f in families.values()
    ]
    return families, _merge_lines(list(families), per_task)


def _competition_items(
    out: Path, tables: dict, notes: PaperNotes, lines: list[str], phantom: bool, tasks: Sequence[str]
) -> list[Item]:
    """Appendix Tables 4 and 5: per task, baseline, MoCo-CXR and their paired difference."""
    items = []
    for stem, item, protocol, what in (
        ("appendix_table4", "Appendix Table 4", "linear", "linear"),
        ("appendix_table5", "Appendix Table 5", "e2e", "end-to-end"),
    ):
        cmp = comparison_for(notes, phantom=phantom)
        items.append(
            _table_item(
                out,
                stem,
                f"{item}. AUC of {what} models on the CheXpert competition tasks: baseline "
                f"({baseline_heading(notes.baseline)}), MoCo-CXR and their paired difference (95% CI).",
                competition_layout(tables, notes.baseline, protocol, cmp),
                lines,
                published_lines(item, notes, phantom=phantom, comparison=cmp, tasks=list(tasks)),
            )
        )
    return items
