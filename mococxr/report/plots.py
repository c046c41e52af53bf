"""Metric against label fraction, one line per initialization (the paper's Figures 3-5).

Built on ``matplotlib.figure.Figure`` directly, not pyplot: no global backend or figure state, so a
report can be drawn from a worker thread or a headless machine (Agg renders the PNG).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mococxr.errors import DataError

INIT_STYLE = {"random": ("tab:gray", "s"), "imagenet": ("tab:blue", "^"), "moco": ("tab:red", "o")}
NAMES = {"auc": "AUC", "auprc": "AUPRC"}
PROTOCOL_NAMES = {"linear": "linear (frozen backbone)", "e2e": "end-to-end"}


def plot_curves(absolute: pd.DataFrame, path: str | os.PathLike, *, metric: str = "auc",
                title: str | None = None) -> Path:
    """Draw ``metric`` against label fraction (log axis) with CI bands and save a PNG at ``path``.

    ``absolute`` is the tidy absolute table of one task (columns backbone, init, protocol, fraction,
    metric, point, lo, hi). One panel per architecture (rows) and protocol (columns); ``title`` (the
    task, dataset, test set and draws: see ``ReportContext.plot_title``) heads the figure.
    """
    data = absolute[absolute["metric"] == metric]
    if data.empty:
        raise DataError(f"plot: no {metric!r} rows in the table")
    if "task" in data.columns and data["task"].nunique() > 1:
        raise DataError(f"plot: the table holds several tasks {sorted(data['task'].unique())}; pass one")
    backbones = list(dict.fromkeys(data["backbone"]))
    protocols = list(dict.fromkeys(data["protocol"]))
    fig = Figure(figsize=(4.2 * len(protocols), 3.4 * len(backbones)), layout="constrained")
    axes = fig.subplots(len(backbones), len(protocols), squeeze=False, sharey=True)
    extra = iter(["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"])
    styles = dict(INIT_STYLE)
    for i, backbone in enumerate(backbones):
        for j, protocol in enumerate(protocols):
            ax = axes[i][j]
            panel = data[(data["backbone"] == backbone) & (data["protocol"] == protocol)]
            for init, line in panel.groupby("init", sort=False):
                if init not in styles:
                    styles[init] = (next(extra, "black"), "D")
                color, marker = styles[init]
                line = line.sort_values("fraction")
                ax.plot(line["fraction"], line["point"], marker=marker, color=color, label=init)
                ax.fill_between(line["fraction"], line["lo"], line["hi"], color=color, alpha=0.18, linewidth=0)
            ax.set_xscale("log")
            fractions = sorted(data["fraction"].unique())
            ax.set_xticks(fractions, [f"{round(100 * f, 6):g}%" for f in fractions])
            ax.set_xticks([], minor=True)
            ax.set_title(f"{backbone}, {PROTOCOL_NAMES.get(protocol, protocol)}", fontsize=10)
            ax.set_xlabel("label fraction")
            if j == 0:
                ax.set_ylabel(f"test {NAMES.get(metric, metric)} (95% CI)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
