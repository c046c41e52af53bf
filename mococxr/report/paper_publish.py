"""Writing a paper family: each table item as Markdown and CSV, the family's ``report.md`` and
``runs.json``, and the report run in MLflow that holds them all (:func:`mococxr.report.record.log_report`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from mococxr.report.paper_captions import caption_markdown
from mococxr.report.paper_notes import PaperNotes
from mococxr.report.paper_runs import _Family
from mococxr.report.record import log_report, report_key
from mococxr.report.tables import to_markdown
from mococxr.tracking import mlflow as mt


def _table_item(
    out: Path,
    stem: str,
    heading: str,
    table: pd.DataFrame,
    lines: Sequence[str],
    own: Sequence[str],
    *,
    markdown: pd.DataFrame | None = None,
) -> tuple[list[Path], str]:
    """``<stem>.md`` (heading, caption, table) and ``<stem>.csv``; returns the paths and the report.md
    section.

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
    items,
    lines: Sequence[str],
    families: Sequence[_Family],
    settings: dict,
    notes: PaperNotes,
    *,
    title: str,
    metrics: dict[str, float],
) -> str:
    """Write ``report.md`` and ``runs.json`` beside the items and log them all as the family's report run."""
    paths = [p for item_paths, _ in items for p in item_paths]
    preamble = f"# {title}\n\nWhat every table and figure below rests on:\n\n{caption_markdown(lines)}\n"
    (out / "report.md").write_text("\n".join([preamble, *(s for _, s in items if s)]))
    runs = pd.concat([f.report.runs for f in families], ignore_index=True)
    used = runs[
        ["run_id", "backbone", "init", "protocol", "task", "fraction", "draw", "test_manifest_sha256"]
    ]
    (out / "runs.json").write_text(
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
    paths += [out / "report.md", out / "runs.json"]
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
        metrics=metrics,
        note=note,
    )
