"""The paper's figures: metric against label fraction, MoCo-CXR against the baseline, with CI bands.

A figure is :func:`mococxr.report.plots.plot_curves` over the cells of one family's absolute table,
filtered to the figure's protocols and the two inits, with the published AUCs as hollow markers where
the paper printed them. The PNG carries a short title only; its caption is text in the family's
``report.html`` and ``report.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mococxr.report import html
from mococxr.report.paper_captions import caption_markdown, comparable_reasons
from mococxr.report.paper_publish import Item
from mococxr.report.paper_tables import backbones, baseline_heading
from mococxr.report.plots import NAMES, plot_curves
from mococxr.report.published import Published

_PROTOCOL_WORDS = {("linear",): "linear models (frozen backbone)", ("e2e",): "models fine-tuned end-to-end"}


def published_points(
    published: Mapping[tuple, Published], backbones: Sequence[str], protocols: Sequence[str]
) -> pd.DataFrame:
    """A table keyed ``(backbone, init, protocol, fraction)`` as tidy rows for ``plot_curves``."""
    rows = [
        {"backbone": b, "init": i, "protocol": p, "fraction": f, "point": v.point, "lo": v.lo, "hi": v.hi}
        for (b, i, p, f), v in published.items()
        if b in backbones and p in protocols
    ]
    return pd.DataFrame(rows, columns=["backbone", "init", "protocol", "fraction", "point", "lo", "hi"])


def figure_item(
    out: Path,
    stem: str,
    title: str,
    absolute: pd.DataFrame,
    *,
    metric: str,
    protocols: Sequence[str],
    inits: Sequence[str],
    lines: Sequence[str],
    notes,
    published: Mapping[tuple, Published] | None,
    phantom: bool,
    source: str,
) -> Item:
    """Draw ``<stem>.png`` under a short title; returns its path and its report sections (heading, the
    figure's own caption lines as text, the image: the reports say the family's ``lines`` once at the top)."""
    data = absolute[absolute["init"].isin(inits) & absolute["protocol"].isin(protocols)]
    order = backbones(data)  # the paper's panel order: ResNet18 above DenseNet121
    data = data.sort_values("backbone", key=lambda s: s.map(order.index), kind="stable")
    points, extra = None, []
    if published is not None:
        points = published_points(published, order, protocols)
        comparable = not comparable_reasons(notes, phantom=phantom)
        extra = [
            f"Hollow markers with dotted error bars: the published values ({source})"
            + ("." if comparable else "; shown for layout only, not comparable with these runs.")
        ]
    what = _PROTOCOL_WORDS.get(tuple(protocols), "linear and end-to-end models")
    name = NAMES.get(metric, metric)
    heading = (
        f"{title}. Test {name} against label fraction, {what}: MoCo-CXR-pretrained "
        f"and {baseline_heading(notes.baseline)}, 95% CI bands."
    )
    path = plot_curves(
        data, out / f"{stem}.png", metric=metric, title=f"{title}: test {name}, {what}", published=points
    )
    parts = [f"## {heading}", caption_markdown(extra), f"![{title}]({stem}.png)"]
    section = "\n\n".join(p for p in parts if p) + "\n"
    return Item([path], section, html.section(heading, html.figure(path, heading, extra)))
