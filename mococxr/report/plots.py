"""Metric against label fraction, one line per initialization (the paper's Figures 3-5).

Built on ``matplotlib.figure.Figure`` directly, not pyplot: no global backend or figure state, so a
report can be drawn from a worker thread or a headless machine (Agg renders the PNG).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mococxr.data.splits import percent
from mococxr.errors import DataError

INIT_STYLE = {"random": ("tab:gray", "s"), "imagenet": ("tab:blue", "^"), "moco": ("tab:red", "o")}
NAMES = {"auc": "AUC", "auprc": "AUPRC"}
PROTOCOL_NAMES = {"linear": "linear (frozen backbone)", "e2e": "end-to-end"}
_EXTRA_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")


def plot_curves(
    absolute: pd.DataFrame,
    path: str | os.PathLike,
    *,
    metric: str = "auc",
    title: str | None = None,
    published: pd.DataFrame | None = None,
) -> Path:
    """Draw ``metric`` against label fraction (log axis) with CI bands and save a PNG at ``path``.

    ``absolute`` is the tidy absolute table of one task (columns backbone, init, protocol, fraction,
    metric, point, lo, hi). One panel per architecture (rows) and protocol (columns); ``title``, a line or
    two, heads the figure: captions belong beside the figure as text (``report.html``), not in the PNG.
    ``published`` (same columns but metric, e.g. a paper's numbers) adds hollow markers with error
    bars, labelled ``<init> (paper)``, to the panels of its backbone and protocol. One legend for all
    panels sits under them, outside every plotting area, so it never hides a CI band.
    """
    data = absolute[absolute["metric"] == metric]
    if data.empty:
        raise DataError(f"plot: no {metric!r} rows in the table")
    if "task" in data.columns and data["task"].nunique() > 1:
        raise DataError(f"plot: the table holds several tasks {sorted(data['task'].unique())}; pass one")
    backbones = list(dict.fromkeys(data["backbone"]))
    protocols = list(dict.fromkeys(data["protocol"]))
    width = max(4.2 * len(protocols), 6.4)
    heading = _wrapped(title.splitlines(), width, size=10) if title else []
    fig = Figure(figsize=(width, 3.2 * len(backbones) + 0.6 + 0.18 * len(heading)), layout="constrained")
    axes = fig.subplots(len(backbones), len(protocols), squeeze=False, sharey=True)
    styles = dict(INIT_STYLE)
    fractions = sorted(
        set(data["fraction"]) | (set(published["fraction"]) if published is not None else set())
    )
    for i, backbone in enumerate(backbones):
        for j, protocol in enumerate(protocols):
            ax = axes[i][j]
            panel = data[(data["backbone"] == backbone) & (data["protocol"] == protocol)]
            _draw_lines(ax, panel, styles)
            if published is not None:
                _published_points(
                    ax,
                    published[(published["backbone"] == backbone) & (published["protocol"] == protocol)],
                    styles,
                )
            _decorate(
                ax,
                f"{backbone}, {PROTOCOL_NAMES.get(protocol, protocol)}",
                fractions,
                f"test {NAMES.get(metric, metric)} (95% CI)" if j == 0 else None,
            )
    _legend(fig, axes)
    if heading:
        fig.suptitle("\n".join(heading), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _legend(fig: Figure, axes) -> None:
    """One legend for every panel, under them (outside the axes): each label once, in drawing order."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="outside lower center",
            ncol=min(len(seen), 4),
            fontsize=8,
            frameon=False,
        )


def _draw_lines(ax, panel: pd.DataFrame, styles: dict) -> None:
    """One line per init of a panel's rows, with its CI band."""
    for init, line in panel.groupby("init", sort=False):
        color, marker = _style(styles, init)
        line = line.sort_values("fraction")
        ax.plot(line["fraction"], line["point"], marker=marker, color=color, label=init)
        ax.fill_between(line["fraction"], line["lo"], line["hi"], color=color, alpha=0.18, linewidth=0)


def _style(styles: dict, init: str) -> tuple[str, str]:
    """An init's (colour, marker): the fixed ones, else the next unused colour."""
    if init not in styles:
        used = {c for c, _ in styles.values()}
        styles[init] = (next((c for c in _EXTRA_COLORS if c not in used), "black"), "D")
    return styles[init]


def _published_points(ax, points: pd.DataFrame, styles: dict) -> None:
    for init, group in points.groupby("init", sort=False):
        color, marker = _style(styles, init)
        group = group.sort_values("fraction")
        ax.errorbar(
            group["fraction"],
            group["point"],
            yerr=[group["point"] - group["lo"], group["hi"] - group["point"]],
            fmt=marker,
            mfc="none",
            color=color,
            linestyle=":",
            capsize=2,
            label=f"{init} (paper)",
        )


def _decorate(ax, title: str, fractions: list[float], ylabel: str | None) -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions, [percent(f) for f in fractions])
    ax.set_xticks([], minor=True)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("label fraction")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _wrapped(lines: Sequence[str], width_in: float, *, size: float = 10) -> list[str]:
    """Title lines wrapped to a figure ``width_in`` inches wide at ``size`` pt."""
    chars = max(40, int(width_in * 72 / (size * 0.56)))
    return [part for line in lines for part in textwrap.wrap(line, chars)]
