"""The ``paper-table2`` family: Table 2, the AUC of a linear fine-tune at 100% labels per MoCo
pretraining learning rate, each row linked to its pretraining trial (:func:`table2_report`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mococxr.errors import ConfigError
from mococxr.report import published as pub
from mococxr.report.paper_captions import comparison_for, protocol_lines, published_lines
from mococxr.report.paper_notes import PaperNotes, Table2Row
from mococxr.report.paper_publish import Item, _publish, _table_item
from mococxr.report.paper_runs import _Family, _gather, _run_link
from mococxr.report.paper_tables import arch, table2_layout
from mococxr.report.tables import _out_folder
from mococxr.tracking import mlflow as mt


def table2_report(
    experiment: str,
    rows: Sequence[Table2Row],
    *,
    notes: PaperNotes,
    out: str | os.PathLike,
    n_replicates: int = 500,
    seed: int = 0,
    store: mt.Store | None = None,
) -> str:
    """Table 2: the AUC of a linear fine-tune at 100% labels per pretraining learning rate, linked to its
    trial.

    Each row's init ``label`` names its fine-tune runs in ``experiment``; the row's pretraining run must
    exist (its experiment id makes the link) and match the runs' ``mococxr.pretrain_run_id``. Of the rows
    sharing a learning rate (one per scheduler), ``table2.md`` shows the one with the best validation score
    (its ``val_objective``, else its runs' ``best/val_auc``); ``table2.csv`` and ``table2.json`` keep them
    all, with ``chosen``. Returns the id of the ``paper-table2`` report run in ``experiment``.
    """
    if not rows:
        raise ConfigError("table2_report: no rows given")
    started = time.monotonic()
    out = _out_folder(out)
    fam = _gather(
        experiment,
        "paper-table2",
        out=out,
        notes=notes,
        n_replicates=n_replicates,
        seed=seed,
        store=store,
        treatment=None,
        inits=sorted({r.label for r in rows}),
        protocols=["linear"],
    )
    items, lines, records = _table2_items(experiment, fam, rows, notes, out, n_replicates)
    metrics = {f"table2/auc_lr{r['lr']:g}_{r['scheduler']}": r["auc"] for r in records}
    metrics |= {f"table2/auc_lr{r['lr']:g}": r["auc"] for r in records if r["chosen"]}
    settings = {
        "paper": "paper-table2",
        "n_replicates": n_replicates,
        "seed": seed,
        "labels": sorted({r.label for r in rows}),
    }
    return _publish(
        experiment,
        out,
        "paper-table2",
        items,
        lines,
        [fam],
        settings,
        notes,
        title=f"paper-table2: {fam.report.context.title}",
        metrics=metrics,
        started=started,
    )


def _table2_items(
    experiment: str, fam: _Family, rows: Sequence[Table2Row], notes: PaperNotes, out: Path, n_replicates: int
) -> tuple[list[Item], list[str], list[dict]]:
    """Table 2 (every row in ``table2.csv`` and ``table2.json``, the chosen ones in ``table2.md``), the
    family's caption lines and the rows' records."""
    ctx = fam.report.context
    links = {r.pretrain_run_id: _run_link(r.pretrain_run_id, r.label) for r in rows}
    cmp = comparison_for(notes, phantom=ctx.phantom, baseline=False)
    table, records, choice = table2_layout(
        fam.report.absolute, fam.report.runs, fam.params, rows, links, experiment=experiment, comparison=cmp
    )
    epochs = pub.PAPER_EPOCHS if ctx.dataset == "chexpert" else None
    lines = protocol_lines(
        ctx,
        fam.params,
        fam.report.absolute,
        notes,
        n_replicates=n_replicates,
        paper_epochs=epochs,
        baseline=False,
    )
    backbones = sorted({r["backbone"] for r in records})
    chosen = table[table["chosen"]]
    own = [choice, *published_lines("Table 2", notes, phantom=ctx.phantom, baseline=False, comparison=cmp)]
    items = [
        _table_item(
            out,
            "table2",
            f"Table 2. AUC of {', '.join(map(arch, backbones))} linear models fine-tuned "
            f"on 100% of the labels from the MoCo checkpoint of each pretraining learning rate (95% CI).",
            table,
            lines,
            own,
            shown=chosen.drop(columns=["link", "chosen"]),
            markdown=_linked(chosen).drop(columns=["link", "chosen"]),
        )
    ]
    rows_json = out / "table2.json"
    rows_json.write_text(json.dumps({"experiment": experiment, "rows": records}, indent=1))
    items.append(Item([rows_json]))
    return items, lines, records


def _linked(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 with each pretraining run a Markdown link to it."""
    return table.assign(
        **{
            "pretraining run": [
                f"[{i}]({link})" for i, link in zip(table["pretraining run"], table["link"], strict=True)
            ]
        }
    )
