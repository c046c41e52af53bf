"""The paper's table layouts and captions, filled from this project's tidy report tables.

Each layout is a DataFrame of strings in the paper's shape: our cells first, then the published numbers
(see :mod:`mococxr.report.published`) in columns headed ``paper ...`` (:func:`paper_header`) and, where
the table's numbers are comparable with the paper's (a :class:`~mococxr.report.compare.Comparison` is
given), its :data:`~mococxr.report.compare.DIFFERS_MARK` where the two differ at the 5% level. Fraction
columns are the union of ours and the paper's: our cell is blank where our runs lack a fraction, the
paper's cell where the paper has no number. Table 2 is one row per pretraining learning rate, its
scheduler chosen on validation (:func:`choose_schedulers`); the other scheduler's rows stay in its CSV
and JSON.

The captions are :mod:`mococxr.report.paper_captions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import NamedTuple

import pandas as pd

from mococxr.data.splits import percent
from mococxr.errors import DataError
from mococxr.report.compare import Comparison
from mococxr.report.published import (
    COMPARISON_ROWS,
    COMPETITION,
    Published,
    competition,
    fraction_key,
    lookup,
    table2,
    task_key,
)
from mococxr.report.tables import PROTOCOL_ORDER, TREATMENT

ARCH = {"resnet18": "ResNet18", "densenet121": "DenseNet121"}
PAPER_BASELINE = "paper baseline (ImageNet)"  # appendix Tables 4-5: the paper's baseline was ImageNet
FINE_TUNING = {"linear": "Linear Model", "e2e": "End-to-End"}


def arch(backbone: str) -> str:
    return ARCH.get(backbone, backbone)


def backbones(tidy: pd.DataFrame) -> list[str]:
    """The table's backbones in the paper's order (ResNet18, DenseNet121), any others after them."""
    order = list(ARCH)
    return sorted(set(tidy["backbone"]), key=lambda b: (order.index(b) if b in order else len(order), b))


def baseline_name(baseline: str) -> str:
    """The baseline as a table row says it: ``ImageNet``, ``Random-init`` or the grid's own label."""
    return {"imagenet": "ImageNet", "random": "Random-init"}.get(baseline, baseline)


def baseline_heading(baseline: str) -> str:
    return {"imagenet": "ImageNet-pretrained", "random": "Random-init"}.get(
        baseline, f"{baseline}-pretrained"
    )


def ours(row, *, signed: bool = False) -> str:
    """``0.812 (0.790, 0.833)``; signed: ``+0.034 (0.012, 0.055)``; blank for no row."""
    if row is None:
        return ""
    return f"{row.point:{'+' if signed else ''}.3f} ({row.lo:.3f}, {row.hi:.3f})"


def theirs(
    published: Published | None, row, comparison: Comparison | None = None, *, signed: bool = False
) -> str:
    """The published number, marked where it and ours (``row``) differ; ``comparison`` None: not comparable,
    never marked."""
    if published is None:
        return ""
    mine = None if row is None else (row.point, row.lo, row.hi)
    mark = comparison.mark(mine, tuple(published)) if comparison is not None else ""
    return f"{published.point:{'+' if signed else ''}.3f} ({published.lo:.3f}, {published.hi:.3f}){mark}"


def paper_header(header: str) -> str:
    """The heading of the column holding the paper's number beside our column ``header``: ``paper 1%``.
    The word leads, so that a heading cut short in a narrow view still tells the two apart."""
    return f"paper {header}"


def _fractions(tidy: pd.DataFrame, paper: Sequence[float]) -> list[float]:
    return sorted({fraction_key(f) for f in tidy["fraction"]} | {fraction_key(f) for f in paper})


def _pick(tidy: pd.DataFrame, fraction: float, **match):
    """The one tidy row at ``fraction`` matching ``match`` (column -> value), or None."""
    keep = tidy["fraction"].map(fraction_key) == fraction_key(fraction)
    for column, value in match.items():
        keep &= tidy[column] == value
    rows = tidy[keep]
    return next(rows.itertuples()) if len(rows) else None


def _fraction_cells(
    tidy: pd.DataFrame,
    fractions: Sequence[float],
    paper: Callable[[float], Published | None],
    comparison: Comparison | None,
    *,
    signed: bool = False,
    **match,
) -> dict[str, str]:
    """Ours at every fraction, then the paper's at every fraction (ours first: a narrow view shows ours)."""
    mine, published = {}, {}
    for f in fractions:
        row = _pick(tidy, f, **match)
        mine[percent(f)] = ours(row, signed=signed)
        published[paper_header(percent(f))] = theirs(paper(f), row, comparison, signed=signed)
    return mine | published


def improvement_layout(
    improvement: pd.DataFrame,
    baseline: str,
    published: Mapping[tuple, Published],
    paper_fractions: Sequence[float],
    comparison: Comparison | None = None,
) -> pd.DataFrame:
    """Table 1's shape: per architecture, e2e vs e2e, linear vs linear, linear vs e2e; cells are AUC
    differences."""
    tidy = improvement[(improvement["metric"] == "auc") & (improvement["baseline"] == baseline)]
    fractions = _fractions(tidy, paper_fractions)
    rows = []
    for backbone in backbones(tidy):
        for pa, pb in COMPARISON_ROWS:
            mine = tidy[
                (tidy["backbone"] == backbone) & (tidy["protocol_a"] == pa) & (tidy["protocol_b"] == pb)
            ]
            if mine.empty:
                continue
            rows.append(
                {
                    "Architecture": arch(backbone),
                    "MoCo-CXR-pretrained": FINE_TUNING[pa],
                    baseline_heading(baseline): FINE_TUNING[pb],
                    **_fraction_cells(
                        mine,
                        fractions,
                        lambda f, k=(backbone, pa, pb): lookup(published, *k, f),
                        comparison,
                        signed=True,
                    ),
                }
            )
    return pd.DataFrame(rows)


def absolute_layout(
    absolute: pd.DataFrame,
    baseline: str,
    published: Mapping[tuple, Published],
    paper_fractions: Sequence[float],
    metric: str = "auc",
    comparison: Comparison | None = None,
) -> pd.DataFrame:
    """Appendix Table 1's shape: Pretraining | Architecture | Fine tuning | one AUC cell per fraction.

    The published numbers are looked up under ``imagenet`` for the baseline rows whatever the
    baseline is (a Random-init baseline shows them for layout only; its caption says so).
    """
    tidy = absolute[(absolute["metric"] == metric) & absolute["init"].isin([TREATMENT, baseline])]
    fractions = _fractions(tidy, paper_fractions)
    rows = []
    for protocol in [p for p in PROTOCOL_ORDER if p in set(tidy["protocol"])]:
        for backbone in backbones(tidy):
            for init, paper_init, name in (
                (TREATMENT, "moco", "MoCo"),
                (baseline, "imagenet", baseline_name(baseline)),
            ):
                mine = tidy[
                    (tidy["backbone"] == backbone) & (tidy["protocol"] == protocol) & (tidy["init"] == init)
                ]
                if mine.empty:
                    continue
                key = (backbone, paper_init, protocol)
                rows.append(
                    {
                        "Pretraining": name,
                        "Architecture": arch(backbone),
                        "Fine tuning": FINE_TUNING[protocol],
                        **_fraction_cells(
                            mine, fractions, lambda f, k=key: lookup(published, *k, f), comparison
                        ),
                    }
                )
    return pd.DataFrame(rows)


def competition_layout(
    tables: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    baseline: str,
    protocol: str,
    comparison: Comparison | None = None,
) -> pd.DataFrame:
    """Appendix Tables 4 (linear) and 5 (e2e): per task and fraction, baseline, MoCo-CXR and improvement.

    ``tables`` maps each task (as the runs name it) to its (absolute, improvement) tidy tables. An
    Architecture column is added when the runs hold several backbones (the paper's are ResNet18). Our
    three columns come first, then the paper's; the paper's baseline is ImageNet-pretrained whatever ours
    is, and its heading says so (:data:`PAPER_BASELINE`).
    """
    rows = []
    heading = f"Baseline ({baseline_name(baseline)})"
    for task, (absolute, improvement) in tables.items():
        a = absolute[(absolute["metric"] == "auc") & (absolute["protocol"] == protocol)]
        d = improvement[
            (improvement["metric"] == "auc")
            & (improvement["protocol_a"] == protocol)
            & (improvement["protocol_b"] == protocol)
            & (improvement["baseline"] == baseline)
        ]
        present = backbones(a)
        paper = [f for (t, p, f) in _competition_keys(task, protocol)]
        for backbone in present:
            for f in _fractions(a[a["backbone"] == backbone], paper):
                pub = competition(task, protocol, f) if backbone == "resnet18" else None
                base = _pick(a, f, backbone=backbone, init=baseline)
                moco = _pick(a, f, backbone=backbone, init=TREATMENT)
                diff = _pick(d, f, backbone=backbone)
                row = {"Task": task} | ({"Architecture": arch(backbone)} if len(present) > 1 else {})
                rows.append(
                    row
                    | {
                        "Label fraction": percent(f),
                        heading: ours(base),
                        "MoCo-CXR": ours(moco),
                        "Improvement": ours(diff, signed=True),
                        PAPER_BASELINE: theirs(pub and pub["baseline"], base, comparison),
                        paper_header("MoCo-CXR"): theirs(pub and pub["moco"], moco, comparison),
                        paper_header("improvement"): theirs(
                            pub and pub["improvement"], diff, comparison, signed=True
                        ),
                    }
                )
    return pd.DataFrame(rows)


def _competition_keys(task: str, protocol: str) -> list[tuple[str, str, float]]:
    return [k for k in COMPETITION if task_key(k[0]) == task_key(task) and k[1] == protocol]


def lr_text(lr: float) -> str:
    """A learning rate as the paper's Table 2 writes it: 1e-4 -> ``1e-4``, 3e-5 -> ``3e-5``,
    0.03 -> ``3e-2``."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


# --------------------------------------------------------------------------- Table 2

OBJECTIVE = (
    "val/linear_auc"  # a pretraining trial's validation objective at its selected epoch (picks checkpoints)
)
FALLBACK_OBJECTIVE = "best/val_auc"  # the row's linear fine-tune runs' best validation AUC (validation only)


class Choice(NamedTuple):
    """Whether a Table 2 row is its learning rate's row, and the validation score that decided."""

    chosen: bool
    criterion: str  # OBJECTIVE, FALLBACK_OBJECTIVE, or "none" (nothing logged: the first trial)
    score: float | None


def _score(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def choose_schedulers(rows: Sequence, fallback: Mapping[str, float | None]) -> list[Choice]:
    """Per pretraining learning rate, the row (``Table2Row``) with the best validation score: the trials'
    ``val_objective`` where every row of that rate has one, else ``fallback[row.label]`` (its fine-tune
    runs' best validation AUC) for all of them; ties and no score at all: the earliest trial. One
    :class:`Choice` per row, in ``rows``' order. The test AUC never decides."""
    choices: list[Choice | None] = [None] * len(rows)
    for key in {lr_text(r.lr) for r in rows}:
        group = sorted((i for i, r in enumerate(rows) if lr_text(r.lr) == key), key=lambda i: rows[i].trial)
        own = all(_score(rows[i].val_objective) is not None for i in group)
        scores = {i: _score(rows[i].val_objective if own else fallback.get(rows[i].label)) for i in group}
        scored = [i for i in group if scores[i] is not None]
        best = max(scored, key=lambda i: scores[i]) if scored else group[0]
        criterion = (OBJECTIVE if own else FALLBACK_OBJECTIVE) if scored else "none"
        for i in group:
            choices[i] = Choice(i == best, criterion, scores[i])
    return choices  # type: ignore[return-value]


def scheduler_line(rows: Sequence, choices: Sequence[Choice]) -> str:
    """The caption line naming each learning rate's scheduler and the validation score that chose it."""
    per = []
    for i in sorted(range(len(rows)), key=lambda i: -rows[i].lr):
        if not choices[i].chosen:
            continue
        others = [
            f"{rows[j].scheduler} {_shown(choices[j].score)}"
            for j in range(len(rows))
            if j != i and lr_text(rows[j].lr) == lr_text(rows[i].lr)
        ]
        said = (
            f"{choices[i].criterion} {_shown(choices[i].score)} against {', '.join(others)}"
            if others
            else "the only trial"
        )
        per.append(f"{lr_text(rows[i].lr)}: {rows[i].scheduler} ({said})")
    return (
        f"One row per pretraining learning rate, as the paper's Table 2; where several trials share a rate, "
        f"the row is the trial with the higher validation score, the criterion that picks checkpoints "
        f"({OBJECTIVE} at the trial's selected epoch; where a trial lacks it, the fine-tune runs' "
        f"{FALLBACK_OBJECTIVE}; never the test AUC): {'; '.join(per)}. The paper does not say which "
        "scheduler its Table 2 used. The other trials' rows are kept in table2.csv and table2.json "
        "(chosen false)."
    )


def _shown(score: float | None) -> str:
    return "not logged" if score is None else f"{score:.3f}"


def _validation(choice: Choice) -> str:
    return "not logged" if choice.score is None else f"{choice.score:.3f} ({choice.criterion})"


def _fallback_scores(params: pd.DataFrame) -> dict[str, float | None]:
    """Per init label, the mean ``best/val_auc`` of its linear runs at 100% of the labels (None: not
    logged)."""
    mine = params[(params["protocol"] == "linear") & (params["fraction"].map(fraction_key) == 1.0)]
    means = pd.to_numeric(mine["best_val_auc"], errors="coerce").groupby(mine["init"]).mean()
    return {label: _score(v) for label, v in means.items()}


def _table2_cell(auc: pd.DataFrame, runs: pd.DataFrame, row, experiment: str):
    """The one tidy AUC row of a Table 2 row's fine-tune runs; a DataError names the row otherwise."""
    mine = auc[auc["init"] == row.label]
    where = f"paper-table2: experiment {experiment!r}, row lr={row.lr:g} (init {row.label!r})"
    if mine.empty:
        raise DataError(
            f"{where}: no linear fine-tune runs at 100% of the labels; inits with such runs: "
            f"{sorted(set(auc['init']))}"
        )
    if len(mine) > 1:
        raise DataError(f"{where}: runs on several backbones {sorted(mine['backbone'])}; one table needs one")
    claimed = {p for p in runs.loc[runs["init"] == row.label, "pretrain_run_id"] if p} - {row.pretrain_run_id}
    if claimed:
        raise DataError(
            f"{where}: its fine-tune runs came from pretraining run(s) {sorted(claimed)}, the row "
            f"names {row.pretrain_run_id!r}"
        )
    return next(mine.itertuples())


def table2_layout(
    absolute: pd.DataFrame,
    runs: pd.DataFrame,
    params: pd.DataFrame,
    rows: Sequence,
    links: Mapping[str, str],
    *,
    experiment: str,
    comparison: Comparison | None = None,
) -> tuple[pd.DataFrame, list[dict], str]:
    """Table 2: every pretraining trial (``rows``: ``Table2Row``) with the AUC of its label's linear runs at
    100% of the labels, sorted as the paper (learning rate from the largest), the chosen trial of each rate
    (:func:`choose_schedulers`) first and alone in carrying the published number; the same rows as records
    for ``table2.json``; and the caption line naming the choices (``params``: ``caption_params`` rows).

    A row whose label has no such runs, has them on several backbones, or whose runs name another
    pretraining run is a DataError naming the row.
    """
    auc = absolute[
        (absolute["metric"] == "auc")
        & (absolute["protocol"] == "linear")
        & (absolute["fraction"].map(fraction_key) == 1.0)
    ]
    choices = choose_schedulers(rows, _fallback_scores(params))
    table, records = [], []
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i].lr, not choices[i].chosen, rows[i].trial)):
        row, choice = rows[i], choices[i]
        r = _table2_cell(auc, runs, row, experiment)
        paper = table2(row.lr) if choice.chosen else None
        link = links[row.pretrain_run_id]
        table.append(
            {
                "Learning rate": lr_text(row.lr),
                "Scheduler": row.scheduler,
                "AUC (lo, hi)": ours(r),
                paper_header("AUC (lo, hi)"): theirs(paper, r, comparison),
                "validation": _validation(choice),
                "chosen": choice.chosen,
                "pretraining run": row.pretrain_run_id,
                "trial": row.trial,
                "checkpoint": f"{row.registered_model} v{row.version}, epoch {row.epoch}",
                "link": link,
            }
        )
        records.append(
            {
                **asdict(row),
                "backbone": r.backbone,
                "auc": r.point,
                "lo": r.lo,
                "hi": r.hi,
                "chosen": choice.chosen,
                "criterion": choice.criterion,
                "validation": choice.score,
                "paper": paper._asdict() if paper else None,
                "link": link,
                "run_ids": r.run_ids.split(),
            }
        )
    return pd.DataFrame(table), records, scheduler_line(rows, choices)
