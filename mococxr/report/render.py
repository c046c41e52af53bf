"""A report's tables rendered: paper-style wide tables of strings, as Markdown and LaTeX, and the files
``write_tables`` writes (tidy CSVs, one LaTeX file per table, ``report.md`` with them all and
``report.html``, the page the MLflow UI shows, with the figures embedded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mococxr.data.splits import percent
from mococxr.report import html
from mococxr.report.bootstrap import METRICS

FRACTION_HEADER = "label fraction "  # what rendered tables put before each percentage column heading


def fraction_label(fraction: float) -> str:
    """0.001 -> '0.1%', 0.01 -> '1%', 1.0 -> '100%' (the paper's column headings)."""
    return percent(fraction)


def wide_table(
    tidy: pd.DataFrame, metric: str = "auc", *, task: str | None = None, digits: int = 3, header: str = ""
) -> pd.DataFrame:
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
                row[header + fraction_label(f)] = (
                    f"{fmt.format(r.point)} ({r.lo:.{digits}f}, {r.hi:.{digits}f})"
                )
            else:
                row[header + fraction_label(f)] = ""
        rows.append(row)
    return pd.DataFrame(
        rows, columns=[heads[k] for k in keys] + [header + fraction_label(f) for f in fractions]
    )


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


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def to_latex(table: pd.DataFrame, *, caption: str | None = None) -> str:
    """A booktabs ``tabular`` (pandas' own needs jinja2, which is not a dependency)."""

    def esc(v) -> str:
        return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(v))

    spec = "".join("r" if _is_numeric_text(table[c]) else "l" for c in table.columns)
    lines = [
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(esc(c) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}", r"\centering", rf"\caption{{{esc(caption)}}}", *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_") or "task"


def table_blocks(
    absolute: pd.DataFrame, improvement: pd.DataFrame, main_task: str, tasks: Sequence[str]
) -> list[tuple[str, str, pd.DataFrame]]:
    """Every table a report shows, in order: (heading, LaTeX file stem, wide table of strings)."""
    names = {"auc": "AUC", "auprc": "AUPRC"}
    blocks = [("absolute", absolute, main_task, False), ("improvement", improvement, main_task, True)]
    blocks += [("absolute", absolute, t, False) for t in tasks if t != main_task and len(tasks) > 1]
    out = []
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
            suffix = "" if task == main_task else f"_{_slug(task)}"
            out.append((heading, f"{kind}_{metric}{suffix}", table))
    return out


def write_tables(
    out: Path,
    absolute: pd.DataFrame,
    improvement: pd.DataFrame,
    main_task: str,
    tasks: Sequence[str],
    title: str,
    *,
    preamble: Sequence[str] = (),
    figures: Sequence[tuple[Path, str, Sequence[str]]] = (),
) -> list[Path]:
    """Write the CSVs (tidy, numeric), one LaTeX file per table, ``report.md`` with them all and
    ``report.html``, the same in one self-contained page (:mod:`mococxr.report.html`) with the figures.

    ``preamble`` lines (what the report is about: see :class:`ReportContext`) open both reports;
    ``figures`` are (PNG under ``out``, heading, caption lines), shown after the tables.
    """
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    paths = [tables / "absolute.csv", tables / "improvement.csv"]
    absolute.to_csv(paths[0], index=False)
    improvement.to_csv(paths[1], index=False)
    sections = [f"# {title}\n", *(f"- {line}" for line in preamble), ""] if preamble else [f"# {title}\n"]
    pages = []
    for heading, stem, table in table_blocks(absolute, improvement, main_task, tasks):
        sections.append(f"## {heading}\n\n{to_markdown(table)}")
        pages.append(html.section(heading, html.table(table)))
        tex = tables / f"{stem}.tex"
        tex.write_text(to_latex(table, caption=heading))
        paths.append(tex)
    for png, heading, lines in figures:
        said = "".join(f"- {line}\n" for line in lines)
        sections.append(f"## {heading}\n\n{said}\n![{heading}]({png.relative_to(out).as_posix()})\n")
        pages.append(html.section(heading, html.figure(png, heading, lines)))
    md = out / "report.md"
    md.write_text("\n".join(sections))
    others = ["report.md", "tables/", "plots/" if figures else "", "runs.json"]
    page = html.write_page(out / "report.html", title, preamble, pages, files=[f for f in others if f])
    return [page, md, *paths]
