"""What a report is about, in words: the task, the dataset (and whether it is the phantom), the test set,
how many draws each cell averages and which checkpoint an init such as ``moco`` is.

A table that does not say these things cannot be read on its own; the terminal text, ``report.md``,
the plot titles and the report run's description all take their words from one :class:`ReportContext`.
Its summary metrics (:func:`summary_metrics`) are what the MLflow UI shows and compares across reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from mococxr.data.splits import percent

BUILTIN_INITS = ("random", "imagenet")


@dataclass(frozen=True)
class ReportContext:
    """The facts a reader needs beside the numbers, gathered from the runs and their predictions."""

    experiment: str
    task: str
    dataset: str
    phantom: bool
    n_test_images: int
    n_test_patients: int
    test_source: str
    n_runs: int
    n_cells: int
    draws: dict[float, tuple[int, int]] = field(default_factory=dict)  # fraction -> (fewest, most) per cell
    checkpoints: list[str] = field(default_factory=list)

    @property
    def dataset_text(self) -> str:
        return f"{self.dataset} (synthetic phantom, not real radiographs)" if self.phantom else self.dataset

    @property
    def title(self) -> str:
        return f"task {self.task}, dataset {self.dataset_text}"

    def draws_text(self) -> str:
        counts = {lo for lo, hi in self.draws.values()} | {hi for lo, hi in self.draws.values()}
        if len(counts) == 1:
            n = counts.pop()
            return (
                f"each cell is the mean over {n} draw{'s' if n != 1 else ''} (random label-fraction samples)"
            )
        per = ", ".join(
            f"{lo if lo == hi else f'{lo}-{hi}'} at {percent(f)}"
            for f, (lo, hi) in sorted(self.draws.items())
        )
        return f"draws (random label-fraction samples) averaged per cell: {per}"

    def test_text(self) -> str:
        return (
            f"test set: {self.n_test_images} images of {self.n_test_patients} patients, "
            f"from {self.test_source}; the same images score every cell"
        )

    def lines(self) -> list[str]:
        """The report's preamble, one fact per line."""
        lines = [
            f"Task {self.task} on dataset {self.dataset_text} (MLflow experiment {self.experiment}).",
            "Columns are label fractions: the share of the training split's labelled images each "
            "fine-tune used.",
            self.draws_text()[0].upper() + self.draws_text()[1:] + ".",
            self.test_text()[0].upper() + self.test_text()[1:] + ".",
            f"{self.n_runs} fine-tune runs in {self.n_cells} cells.",
        ]
        lines += [f"Init {c}." for c in self.checkpoints]
        return lines

    def plot_title(self) -> str:
        """The short title drawn into a plot: task and dataset (the rest is :meth:`plot_caption`)."""
        return f"{self.task} on {self.dataset_text}"

    def plot_caption(self) -> str:
        """What a plot's numbers rest on, as text beside it: the test set and the draws per cell."""
        return _sentence(f"{self.test_text().split(';')[0]}; {self.draws_text()}")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def report_context(experiment: str, runs: pd.DataFrame, image_ids, patient_ids) -> ReportContext:
    """The context of a report over ``runs`` (find_runs rows) scored on the given test images."""
    draws = {}
    for fraction, at_f in runs.groupby("fraction"):
        sizes = at_f.groupby(["backbone", "init", "protocol"]).size()
        draws[float(fraction)] = (int(sizes.min()), int(sizes.max()))
    sources = sorted(set(runs["test_source"])) if "test_source" in runs else ["unknown"]
    return ReportContext(
        experiment=experiment,
        task=str(runs["task"].iloc[0]),
        dataset=str(runs["dataset"].iloc[0]),
        phantom=bool(runs["phantom"].any()) if "phantom" in runs else False,
        n_test_images=len(image_ids),
        n_test_patients=len(set(patient_ids)),
        test_source="; ".join(sources),
        n_runs=len(runs),
        n_cells=len(runs[["backbone", "init", "protocol", "fraction"]].drop_duplicates()),
        draws=draws,
        checkpoints=checkpoint_lines(runs),
    )


def checkpoint_lines(runs: pd.DataFrame) -> list[str]:
    """Which checkpoint each pretrained init is:
    ``moco = registered model X version 3 (pretraining run R, epoch 5)``."""
    lines = []
    pretrained = runs[~runs["init"].isin(BUILTIN_INITS)]
    cols = [
        c
        for c in ("registered_model", "registry_version", "pretrain_run_id", "checkpoint_epoch")
        if c in runs
    ]
    for init, group in pretrained.groupby("init", sort=False):
        origins = []
        for row in group[cols].drop_duplicates().to_dict(orient="records"):
            run = ""
            if row.get("pretrain_run_id"):
                epoch = f", epoch {row['checkpoint_epoch']}" if row.get("checkpoint_epoch") else ""
                run = f"pretraining run {row['pretrain_run_id']}{epoch}"
            if row.get("registry_version"):
                version = (
                    f"registered model {row.get('registered_model') or '?'} version {row['registry_version']}"
                )
                run = f"{version} ({run})" if run else version
            origins.append(run or "a checkpoint the runs do not name")
        lines.append(f"{init} = " + "; ".join(origins))
    return lines


def _key(text: str) -> str:
    """A metric-name segment: MLflow accepts letters, digits, ``_-. /:``; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(text))


def summary_metrics(
    context: ReportContext, absolute: pd.DataFrame, improvement: pd.DataFrame
) -> dict[str, float]:
    """The report run's metrics: its size, each cell's AUC and each paired AUC difference per label fraction.

    Names: ``absolute/<init>_<protocol>/auc_frac0.01`` and
    ``improvement/<protocol>_vs_<baseline>/auc_frac0.01``
    (``..._vs_<baseline>_<protocol>`` when the protocols differ), prefixed by the backbone when the
    report holds several.
    """
    out = {
        "report/n_runs": context.n_runs,
        "report/n_cells": context.n_cells,
        "report/n_test_images": context.n_test_images,
        "report/n_test_patients": context.n_test_patients,
    }
    several = absolute["backbone"].nunique() > 1 if len(absolute) else False
    for r in absolute[absolute["metric"] == "auc"].itertuples():
        arch = f"{_key(r.backbone)}/" if several else ""
        out[f"absolute/{arch}{_key(r.init)}_{_key(r.protocol)}/auc_frac{r.fraction:g}"] = float(r.point)
    for r in improvement[improvement["metric"] == "auc"].itertuples():
        arch = f"{_key(r.backbone)}/" if several else ""
        pair = f"{_key(r.protocol_a)}_vs_{_key(r.baseline)}" + (
            "" if r.protocol_a == r.protocol_b else f"_{r.protocol_b}"
        )
        out[f"improvement/{arch}{pair}/auc_frac{r.fraction:g}"] = float(r.point)
    return out


def coverage_metrics(runs: pd.DataFrame) -> dict[str, float]:
    """The counters of a report over ``runs`` (``find_runs`` rows of every family and task it shows
    together): its fine-tune runs, cells (task x architecture x init x protocol x label fraction), tasks."""
    cells = [c for c in ("task", "backbone", "init", "protocol", "fraction") if c in runs]
    return {
        "report/n_runs": float(runs["run_id"].nunique()),
        "report/n_cells": float(len(runs[cells].drop_duplicates())),
        "report/n_tasks": float(runs["task"].nunique()),
    }
