"""Writing a paper family: each table item as Markdown and CSV, the family's ``report.md``, ``report.html``
(every table and figure on one self-contained page: :mod:`mococxr.report.html`) and ``runs.json``, and the
report run in MLflow that holds them all (:func:`mococxr.report.record.log_report`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from mococxr.report import html
from mococxr.report.describe import coverage_metrics
from mococxr.report.paper_captions import caption_markdown
from mococxr.report.paper_notes import PaperNotes
from mococxr.report.paper_runs import _Family
from mococxr.report.record import log_report, report_key
from mococxr.report.tables import to_markdown
from mococxr.tracking import mlflow as mt


class Item(NamedTuple):
    """One paper item as its family shows it: its files, its ``report.md`` section and its ``report.html``
    section (blank for a file that is no item of its own, such as ``table2.json``)."""

    paths: list[Path]
    markdown: str = ""
    html: str = ""


def _table_item(
    out: Path,
    stem: str,
    heading: str,
    table: pd.DataFrame,
    lines: Sequence[str],
    own: Sequence[str],
    *,
    shown: pd.DataFrame | None = None,
    markdown: pd.DataFrame | None = None,
) -> Item:
    """``<stem>.md`` (heading, caption, table) and ``<stem>.csv`` (``table``, every row and column); returns
    the paths and the report sections.

    ``shown`` (default ``table``) is what the Markdown and the page show, ``markdown`` the same with
    Markdown links (the page shows plain text: links do not leave MLflow's viewer). The caption is the
    family's ``lines`` and the item's ``own``; the reports say the family's lines once, so their sections
    hold only the item's own.
    """
    shown = table if shown is None else shown
    body = to_markdown(markdown if markdown is not None else shown)
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(f"# {heading}\n\n{caption_markdown([*lines, *own])}\n\n{body}")
    table.to_csv(csv, index=False)
    page = html.section(heading, html.caption(own), html.table(shown))
    return Item([md, csv], f"## {heading}\n\n{caption_markdown(own)}\n\n{body}", page)


def _merge_lines(tasks: Sequence[str], per_task: Sequence[Sequence[str]]) -> list[str]:
    """Caption lines of several tasks: a line all share once, a line that differs once per task, prefixed."""
    common = [line for line in per_task[0] if all(line in lines for lines in per_task[1:])]
    own = [
        f"{task}: {line}"
        for task, lines in zip(tasks, per_task, strict=True)
        for line in lines
        if line not in common
    ]
    return common + own


def _publish(
    experiment: str,
    out: Path,
    name: str,
    items: Sequence[Item],
    lines: Sequence[str],
    families: Sequence[_Family],
    settings: dict,
    notes: PaperNotes,
    *,
    title: str,
    metrics: dict[str, float],
    started: float,
) -> str:
    """Write ``report.md``, ``report.html`` and ``runs.json`` beside the items and log them all as the
    family's report run (``started``: the ``time.monotonic()`` at which the family began)."""
    paths = [p for item in items for p in item.paths]
    preamble = f"# {title}\n\nWhat every table and figure below rests on:\n\n{caption_markdown(lines)}\n"
    (out / "report.md").write_text("\n".join([preamble, *(i.markdown for i in items if i.markdown)]))
    runs = pd.concat([f.report.runs for f in families], ignore_index=True)
    paths += [out / "report.md", _runs_json(out, experiment, settings, notes, runs)]
    page = html.write_page(
        out / "report.html",
        title,
        lines,
        [i.html for i in items if i.html],
        files=[p.name for p in paths],
    )
    paths.insert(0, page)
    listing = "\n".join(f"- `{p.name}`" for p in paths)
    note = "\n\n".join([f"**Paper report** {title}.", "Items:\n" + listing, caption_markdown(lines)])
    ctx = families[0].report.context
    tasks = sorted({f.report.context.task for f in families})
    run_tags = mt.tags(kind="report", dataset=ctx.dataset, task=tasks[0] if len(tasks) == 1 else None)
    params = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in settings.items()}
    return log_report(
        experiment,
        out,
        paths,
        key=report_key(experiment, settings),
        run_name=name,
        run_tags=run_tags,
        params=params,
        metrics={**metrics, **coverage_metrics(runs)},  # the counters over every family, not the last one
        note=note,
        started=started,
    )


def _runs_json(out: Path, experiment: str, settings: dict, notes: PaperNotes, runs: pd.DataFrame) -> Path:
    """``runs.json``: the family's settings and notes, and the fine-tune runs it used."""
    used = runs[
        ["run_id", "backbone", "init", "protocol", "task", "fraction", "draw", "test_manifest_sha256"]
    ]
    path = out / "runs.json"
    path.write_text(
        json.dumps(
            {
                "experiment": experiment,
                **settings,
                "notes": asdict(notes),
                "runs": used.to_dict(orient="records"),
            },
            indent=1,
        )
    )
    return path
