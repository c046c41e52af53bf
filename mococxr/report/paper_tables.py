"""The paper's table layouts and captions, filled from this project's tidy report tables.

Each layout is a DataFrame of strings in the paper's shape, with the published number (see
:mod:`mococxr.report.published`) beside each of our cells and :data:`MARK` where the published point
lies outside our 95% interval. Fraction columns are the union of ours and the paper's: our cell is blank
where our runs lack a fraction, the paper's cell where the paper has no number.

The captions name what a reader must know before comparing: the test set, the linear head, the epochs,
the draws, the bootstrap, the data (phantom or not), the baseline and where MoCo pretraining started.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict

import pandas as pd

from mococxr.errors import DataError
from mococxr.report.describe import ReportContext, percent
from mococxr.report.published import (
    COMPARISON_ROWS,
    COMPETITION,
    PAPER_BATCH_SIZE,
    PAPER_LR,
    PAPER_REPLICATES,
    Published,
    competition,
    fraction_key,
    lookup,
    table2,
    task_key,
)
from mococxr.report.tables import PROTOCOL_ORDER, TREATMENT

MARK = "†"
TOLERANCE = 5e-4  # the paper prints 3 decimals: a published point within half a unit of our interval is inside
ARCH = {"resnet18": "ResNet18", "densenet121": "DenseNet121"}
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
    return {"imagenet": "ImageNet-pretrained", "random": "Random-init"}.get(baseline, f"{baseline}-pretrained")


def outside(published: Published, lo: float, hi: float) -> bool:
    """Whether the published point falls outside our interval (allowing for its 3-decimal rounding)."""
    return published.point < lo - TOLERANCE or published.point > hi + TOLERANCE


def ours(row, *, signed: bool = False) -> str:
    """``0.812 (0.790, 0.833)``; signed: ``+0.034 (0.012, 0.055)``; blank for no row."""
    if row is None:
        return ""
    return f"{row.point:{'+' if signed else ''}.3f} ({row.lo:.3f}, {row.hi:.3f})"


def theirs(published: Published | None, row, *, signed: bool = False) -> str:
    """The published number, marked when it lies outside our interval (``row``, None: not compared)."""
    if published is None:
        return ""
    mark = f" {MARK}" if row is not None and outside(published, row.lo, row.hi) else ""
    return f"{published.point:{'+' if signed else ''}.3f} ({published.lo:.3f}, {published.hi:.3f}){mark}"


def _fractions(tidy: pd.DataFrame, paper: Sequence[float]) -> list[float]:
    return sorted({fraction_key(f) for f in tidy["fraction"]} | {fraction_key(f) for f in paper})


def _pick(tidy: pd.DataFrame, fraction: float, **match):
    """The one tidy row at ``fraction`` matching ``match`` (column -> value), or None."""
    keep = tidy["fraction"].map(fraction_key) == fraction_key(fraction)
    for column, value in match.items():
        keep &= tidy[column] == value
    rows = tidy[keep]
    return next(rows.itertuples()) if len(rows) else None


def _fraction_cells(tidy: pd.DataFrame, fractions: Sequence[float], paper: Callable[[float], Published | None],
                    *, signed: bool = False, **match) -> dict[str, str]:
    cells = {}
    for f in fractions:
        row = _pick(tidy, f, **match)
        cells[percent(f)] = ours(row, signed=signed)
        cells[f"{percent(f)} paper"] = theirs(paper(f), row, signed=signed)
    return cells


def improvement_layout(improvement: pd.DataFrame, baseline: str, published: Mapping[tuple, Published],
                       paper_fractions: Sequence[float]) -> pd.DataFrame:
    """Table 1's shape: per architecture, e2e vs e2e, linear vs linear, linear vs e2e; cells are AUC differences."""
    tidy = improvement[(improvement["metric"] == "auc") & (improvement["baseline"] == baseline)]
    fractions = _fractions(tidy, paper_fractions)
    rows = []
    for backbone in backbones(tidy):
        for pa, pb in COMPARISON_ROWS:
            mine = tidy[(tidy["backbone"] == backbone) & (tidy["protocol_a"] == pa) & (tidy["protocol_b"] == pb)]
            if mine.empty:
                continue
            rows.append({"Architecture": arch(backbone), "MoCo-CXR-pretrained": FINE_TUNING[pa],
                         baseline_heading(baseline): FINE_TUNING[pb],
                         **_fraction_cells(mine, fractions, lambda f, k=(backbone, pa, pb): lookup(published, *k, f),
                                           signed=True)})
    return pd.DataFrame(rows)


def absolute_layout(absolute: pd.DataFrame, baseline: str, published: Mapping[tuple, Published],
                    paper_fractions: Sequence[float], metric: str = "auc") -> pd.DataFrame:
    """Appendix Table 1's shape: Pretraining | Architecture | Fine tuning | one AUC cell per fraction.

    The published numbers are looked up under ``imagenet`` for the baseline rows whatever the
    baseline is (a Random-init baseline shows them for layout only; its caption says so).
    """
    tidy = absolute[(absolute["metric"] == metric) & absolute["init"].isin([TREATMENT, baseline])]
    fractions = _fractions(tidy, paper_fractions)
    rows = []
    for protocol in [p for p in PROTOCOL_ORDER if p in set(tidy["protocol"])]:
        for backbone in backbones(tidy):
            for init, paper_init, name in ((TREATMENT, "moco", "MoCo"), (baseline, "imagenet", baseline_name(baseline))):
                mine = tidy[(tidy["backbone"] == backbone) & (tidy["protocol"] == protocol) & (tidy["init"] == init)]
                if mine.empty:
                    continue
                key = (backbone, paper_init, protocol)
                rows.append({"Pretraining": name, "Architecture": arch(backbone), "Fine tuning": FINE_TUNING[protocol],
                             **_fraction_cells(mine, fractions, lambda f, k=key: lookup(published, *k, f))})
    return pd.DataFrame(rows)


def competition_layout(tables: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], baseline: str,
                       protocol: str) -> pd.DataFrame:
    """Appendix Tables 4 (linear) and 5 (e2e): per task and fraction, baseline, MoCo-CXR and improvement.

    ``tables`` maps each task (as the runs name it) to its (absolute, improvement) tidy tables. An
    Architecture column is added when the runs hold several backbones (the paper's are ResNet18).
    """
    rows = []
    heading = f"Baseline ({baseline_name(baseline)})"
    for task, (absolute, improvement) in tables.items():
        a = absolute[(absolute["metric"] == "auc") & (absolute["protocol"] == protocol)]
        d = improvement[(improvement["metric"] == "auc") & (improvement["protocol_a"] == protocol)
                        & (improvement["protocol_b"] == protocol) & (improvement["baseline"] == baseline)]
        present = backbones(a)
        paper = [f for (t, p, f) in _competition_keys(task, protocol)]
        for backbone in present:
            for f in _fractions(a[a["backbone"] == backbone], paper):
                pub = competition(task, protocol, f) if backbone == "resnet18" else None
                base = _pick(a, f, backbone=backbone, init=baseline)
                moco = _pick(a, f, backbone=backbone, init=TREATMENT)
                diff = _pick(d, f, backbone=backbone)
                row = {"Task": task} | ({"Architecture": arch(backbone)} if len(present) > 1 else {})
                rows.append(row | {
                    heading: ours(base), f"{heading} paper": theirs(pub and pub["baseline"], base),
                    "MoCo-CXR": ours(moco), "MoCo-CXR paper": theirs(pub and pub["moco"], moco),
                    "Improvement": ours(diff, signed=True),
                    "Improvement paper": theirs(pub and pub["improvement"], diff, signed=True),
                    "Label fraction": percent(f)})
    return pd.DataFrame(rows)


def _competition_keys(task: str, protocol: str) -> list[tuple[str, str, float]]:
    return [k for k in COMPETITION if task_key(k[0]) == task_key(task) and k[1] == protocol]


# --------------------------------------------------------------------------- captions


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def head_line(params: pd.DataFrame) -> str | None:
    """The linear head of the linear runs: ``plain`` is the paper's; ``standardized`` (the default of runs
    that log no ``head``) is not."""
    linear = params[params["protocol"] == "linear"]
    if linear.empty:
        return None
    heads = linear["head"].value_counts()
    if len(heads) > 1:
        return "Linear heads differ between runs: " + ", ".join(f"{h} in {n} runs" for h, n in heads.items()) + "."
    if heads.index[0] == "plain":
        return "Linear head: a plain linear layer on the frozen features, as in the paper."
    return (f"Linear head: {heads.index[0]}, unlike the paper: the frozen features are standardised (a "
            "parameter-free BatchNorm) before the linear layer.")


def epochs_line(params: pd.DataFrame, paper_epochs: Mapping[float, int] | None) -> str:
    """Epochs per label fraction as the runs resolved them, against the paper's rule, and any step floor."""
    per = []
    for fraction, group in params.groupby("fraction"):
        values = sorted({v for v in group["epochs_resolved"] if v})
        per.append(f"{percent(fraction)}: {'/'.join(values) or 'not logged'}")
    paper = (", the paper: " + ", ".join(f"{percent(f)}: {e}" for f, e in paper_epochs.items())
             if paper_epochs else ", the paper gives none for this dataset")
    line = f"Fine-tune epochs per label fraction: {', '.join(per)} ({paper.lstrip(', ')})"
    floors = sorted({v for v in params["min_steps"] if v not in ("", "None", "0")})
    if floors:
        line += f"; at least {'/'.join(floors)} optimizer steps per run (min_steps, not in the paper)"
    return line + "."


def validation_line(params: pd.DataFrame) -> str:
    """When the runs validated (``val_every``; runs that log none validated every epoch): the paper states
    no cadence, so the plan's choice is named."""
    per = []
    for protocol, group in params.groupby("protocol", sort=True):
        values = sorted({int(v) for v in group["val_every"] if str(v).isdigit()} or {1})
        every = "/".join(map(str, values))
        per.append(f"{protocol} every epoch" if values == [1] else f"{protocol} every {every} epochs and after the last")
    return (f"Each run reports its epoch of best validation AUC, validated {', '.join(per)} (the paper states no "
            "validation cadence).")


AUGMENTATIONS = {"cxr": "random rotation within 10 degrees and horizontal flip", "mocov2": "MoCo v2's crops and "
                 "colour jitter", "none": "none (the eval resize only; linear heads train on cached frozen features)"}


def augmentation_line(params: pd.DataFrame) -> str:
    """Fine-tune augmentation per protocol (runs that log no ``preset`` used ``cxr``): the paper does not say."""
    per = []
    for protocol, group in params.groupby("protocol", sort=True):
        presets = sorted({str(v) or "cxr" for v in group["preset"]})
        per.append(f"{protocol} {', '.join(AUGMENTATIONS.get(x, x) for x in presets)}")
    return f"Fine-tune augmentation: {'; '.join(per)} (the paper does not say whether it augmented while fine-tuning)."


def optimiser_line(params: pd.DataFrame) -> str | None:
    """Learning rate and batch size, said only where they differ from the paper's 3e-5 and 16."""
    lrs = sorted({float(v) for v in params["lr"] if v})
    sizes = sorted({int(v) for v in params["batch_size"] if v})
    if lrs in ([], [PAPER_LR]) and sizes in ([], [PAPER_BATCH_SIZE]):
        return None
    shown = ", ".join(f"{v:g}" for v in lrs) or "?"
    return (f"Fine-tune learning rate {shown} and batch size {', '.join(map(str, sizes)) or '?'} "
            f"(the paper: {PAPER_LR:g} and {PAPER_BATCH_SIZE}).")


def protocol_lines(context: ReportContext, params: pd.DataFrame, absolute: pd.DataFrame, notes, *,
                   n_replicates: int, paper_epochs: Mapping[float, int] | None, baseline: bool = True) -> list[str]:
    """What every caption of a family says beside its own title (``notes``: a ``PaperNotes``; ``baseline``:
    whether the family compares with a baseline init, and so names it)."""
    lines = [context.lines()[0], _sentence(context.test_text())]
    if context.phantom:
        lines.append("Phantom data: synthetic images, not radiographs; the numbers check the pipeline, not MoCo-CXR.")
    lines += [x for x in (head_line(params), epochs_line(params, paper_epochs), validation_line(params),
                          augmentation_line(params), optimiser_line(params)) if x]
    lines.append(_sentence(context.draws_text()) + " The paper averages several random draws at small fractions "
                 "without saying how many.")
    single = int(absolute["n_single_class"].max()) if len(absolute) else 0
    left_out = f"; {single} replicates holding one class were left out" if single else ""
    lines.append(f"{n_replicates} paired bootstrap replicates of the test images (the paper: {PAPER_REPLICATES}), "
                 f"95% percentile intervals{left_out}.")
    lines.append("MoCo pretraining started from ImageNet weights, as in the paper." if notes.moco_start == "imagenet"
                 else f"MoCo pretraining started from {notes.moco_start} weights; the paper started from ImageNet.")
    if baseline:
        lines.append("Baseline: ImageNet-pretrained, as in the paper." if notes.baseline == "imagenet" else
                     f"Baseline: {baseline_name(notes.baseline)} (init {notes.baseline!r}); the paper's is "
                     "ImageNet-pretrained.")
    lines += [_sentence(x) for x in notes.extra]
    lines += [f"Init {c}." for c in context.checkpoints]
    return lines


def published_lines(item: str, notes, *, phantom: bool, baseline: bool = True) -> list[str]:
    """What the ``paper`` columns hold, whether they compare, and the legend of :data:`MARK`.

    They are for layout only on the phantom, and, in a table with a ``baseline``, when the baseline
    is not the paper's ImageNet-pretrained one.
    """
    lines = [f"Columns headed 'paper' hold the published numbers of the paper's {item}; a blank paper cell: "
             "the paper has no number there, a blank cell of ours: our runs lack that fraction."]
    reasons = (["these runs are on synthetic phantom images, the paper's on radiographs"] if phantom else [])
    if baseline and notes.baseline != "imagenet":
        reasons.append(f"our baseline is {baseline_name(notes.baseline)}, the paper's ImageNet-pretrained")
    if reasons:
        lines.append(f"The published numbers are shown for layout only and are not comparable with these runs: "
                     f"{'; '.join(reasons)}.")
    lines.append(f"{MARK} the published point lies outside our 95% interval (by more than its rounding).")
    return lines


def caption_markdown(lines: Sequence[str]) -> str:
    """Caption lines as the Markdown list that opens each item."""
    return "\n".join(f"- {line}" for line in lines)


def lr_text(lr: float) -> str:
    """A learning rate as the paper's Table 2 writes it: 1e-4 -> ``1e-4``, 3e-5 -> ``3e-5``, 0.03 -> ``3e-2``."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def table2_layout(absolute: pd.DataFrame, runs: pd.DataFrame, rows: Sequence, links: Mapping[str, str], *,
                  experiment: str) -> tuple[pd.DataFrame, list[dict]]:
    """Table 2: one row per pretraining trial (``rows``: ``Table2Row``) with the AUC of its label's linear
    runs at 100% of the labels; and the same rows as records for ``table2.json``.

    A row whose label has no such runs, has them on several backbones, or whose runs name another
    pretraining run is a DataError naming the row.
    """
    auc = absolute[(absolute["metric"] == "auc") & (absolute["protocol"] == "linear")
                   & (absolute["fraction"].map(fraction_key) == 1.0)]
    table, records = [], []
    for row in rows:
        mine = auc[auc["init"] == row.label]
        where = f"paper-table2: experiment {experiment!r}, row lr={row.lr:g} (init {row.label!r})"
        if mine.empty:
            raise DataError(f"{where}: no linear fine-tune runs at 100% of the labels; inits with such runs: "
                            f"{sorted(set(auc['init']))}")
        if len(mine) > 1:
            raise DataError(f"{where}: runs on several backbones {sorted(mine['backbone'])}; one table needs one")
        claimed = {p for p in runs.loc[runs["init"] == row.label, "pretrain_run_id"] if p} - {row.pretrain_run_id}
        if claimed:
            raise DataError(f"{where}: its fine-tune runs came from pretraining run(s) {sorted(claimed)}, the row "
                            f"names {row.pretrain_run_id!r}")
        r, paper = next(mine.itertuples()), table2(row.lr)
        link = links[row.pretrain_run_id]
        table.append({"Learning rate": lr_text(row.lr), "Scheduler": row.scheduler, "AUC (lo, hi)": ours(r),
                      "paper": theirs(paper, r), "pretraining run": row.pretrain_run_id, "trial": row.trial,
                      "checkpoint": f"{row.registered_model} v{row.version}, epoch {row.epoch}", "link": link})
        records.append({**asdict(row), "backbone": r.backbone, "auc": r.point, "lo": r.lo, "hi": r.hi,
                        "paper": paper._asdict() if paper else None, "link": link, "run_ids": r.run_ids.split()})
    return pd.DataFrame(table), records
