"""A report as one self-contained HTML page, ``report.html``: the file to open in the MLflow UI.

MLflow 3's artifact viewer shows Markdown as plain text, but an ``.html`` artifact as a page: it loads the
file into an iframe from a blob URL with ``sandbox="allow-scripts"``. Relative links to the run's other
artifacts do not resolve there and links cannot leave the frame, so the page carries everything itself:
the CSS inline, each figure a ``data:image/png;base64`` URI, other files named as text.

The layout is for the artifact pane of a 1600 px browser window (about 1100 px wide): captions and
column headings wrap, numbers never do. A cell holding an estimate and its interval,
``0.812 (0.790, 0.833)``, shows the point on one line and the interval under it in a smaller font, and a
column without a value in any row is left out (and named), so a paper table of eleven columns fits the
pane. A long intro (a paper family's notes) starts folded, so that the first table shows at once. Every
piece of text goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

# an estimate, its interval and what follows (a mark): "+0.034 (0.012, 0.055) ≠"
_INTERVAL = re.compile(r"^([+-]?\d[\d.]*(?:e[+-]?\d+)?) (\([+-]?\d[\d.]*, [+-]?\d[\d.]*\))(.*)$")
_NUMBER = re.compile(r"^[+-]?\.?\d")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 8px 10px 40px; }
main { max-width: 1100px; }
h1 { font-size: 20px; margin: 4px 0 10px; }
h2 { font-size: 16px; margin: 26px 0 6px; border-top: 1px solid #d0d7de; padding-top: 12px; }
details.intro > summary { cursor: pointer; font-size: 13px; color: #3d444d; }
ul.caption { margin: 4px 0 8px; padding-left: 20px; font-size: 13px; color: #3d444d; }
ul.caption li { margin: 1px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 4px; }
th, td { border: 1px solid #d0d7de; padding: 3px 4px; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; text-align: left; white-space: normal;
     overflow-wrap: break-word; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.num .ci { display: block; font-size: 10px; color: #57606a; }
tr:nth-child(even) td { background: #fafbfc; }
p.note { font-size: 12px; color: #57606a; margin: 2px 0 8px; }
figure { margin: 8px 0 12px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-size: 13px; color: #3d444d; }
p.files { font-size: 13px; color: #57606a; margin-top: 28px; }
"""
OPEN_INTRO = 8  # an intro of more lines starts folded (a paper family's notes), so the first table shows


def text(value) -> str:
    """``value`` as escaped HTML text (quotes too); a missing value (None, NaN) as nothing."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return html.escape(str(value), quote=True)


def data_uri(path: str | os.PathLike) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI, so that the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def caption(lines: Iterable[str]) -> str:
    """Caption lines as a list; nothing for none."""
    items = "".join(f"<li>{text(line)}</li>" for line in lines if line)
    return f'<ul class="caption">{items}</ul>' if items else ""


def _cell(value) -> str:
    shown = text(value)
    raw = "" if not shown else str(value)
    match = _INTERVAL.match(raw)
    if match:
        point, interval, rest = match.groups()
        return f'<td class="num">{text(point + rest)}<span class="ci">{text(interval)}</span></td>'
    if _NUMBER.match(raw):
        return f'<td class="num">{shown}</td>'
    return f'<td class="text">{shown}</td>'


def blank_columns(frame: pd.DataFrame) -> list[str]:
    """The columns without a value in any row (a label fraction neither we nor the paper have)."""
    return [c for c in frame.columns if not any(text(v).strip() for v in frame[c])]


def table(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table: headings wrap; estimates, intervals and other numbers do not.

    Columns without a value in any row (:func:`blank_columns`) are left out, and named under the table,
    so that a wide paper table fits the page; the CSV files keep them.
    """
    blank = blank_columns(frame)
    shown = frame.drop(columns=blank)
    head = "".join(f'<th scope="col">{text(c)}</th>' for c in shown.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown.itertuples(index=False))
    note = (
        f'<p class="note">Left out, no value in any row: {text(", ".join(map(str, blank)))}.</p>'
        if blank
        else ""
    )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}'
    )


def figure(path: str | os.PathLike, alt: str, lines: Sequence[str] = ()) -> str:
    """A PNG embedded as a data URI, its caption lines as text under it."""
    under = f"<figcaption>{caption(lines)}</figcaption>" if any(lines) else ""
    return f'<figure><img src="{data_uri(path)}" alt="{text(alt)}">{under}</figure>'


def section(heading: str, *parts: str) -> str:
    """A heading and the parts under it (HTML already made by this module's functions)."""
    return f"<section><h2>{text(heading)}</h2>{''.join(parts)}</section>"


def page(title: str, intro: Sequence[str], sections: Sequence[str], *, files: Sequence[str] = ()) -> str:
    """The whole page: ``title``, the ``intro`` lines (what every table rests on), the sections and a
    closing line naming the report's other ``files`` (they sit beside ``report.html`` in the run)."""
    others = (
        '<p class="files">Beside this page in the run\'s artifacts: '
        + ", ".join(f"<code>{text(f)}</code>" for f in files)
        + ".</p>"
        if files
        else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{text(title)}</title><style>{CSS}</style></head>"
        f"<body><main><h1>{text(title)}</h1>{_intro(intro)}{''.join(sections)}{others}</main></body></html>\n"
    )


def _intro(lines: Sequence[str]) -> str:
    """The intro lines, folded under a summary when there are more than :data:`OPEN_INTRO`."""
    if len(lines) <= OPEN_INTRO:
        return caption(lines)
    summary = f"What every table and figure below rests on ({len(lines)} notes: data, test set, protocol)"
    return f'<details class="intro"><summary>{text(summary)}</summary>{caption(lines)}</details>'


def write_page(
    path: str | os.PathLike,
    title: str,
    intro: Sequence[str],
    sections: Sequence[str],
    *,
    files: Sequence[str] = (),
) -> Path:
    """Write :func:`page` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(page(title, intro, sections, files=files), encoding="utf-8")
    return path
