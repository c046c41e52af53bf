"""The captions of the paper's tables and figures: every way this protocol differs from the paper's.

A family's caption is its common lines (task, test set and its scored image count, phantom or not,
pretraining images, uncertainty policy, draws, bootstrap, where MoCo started, the baseline) and then
one block per protocol, each line prefixed ``Linear:`` or ``End-to-end:`` (learning rate and the
per-run linear choice, epochs per label fraction in numeric order, augmentation, head, validation
cadence, the largest probe gap, how many runs were best at their last epoch). All of it comes from the
runs' own params, metrics and tags (:func:`mococxr.report.paper_params.caption_params`); a fact older
runs did not log is left out or said to be not logged. :func:`published_lines` says what the ``paper``
columns hold and, only where the numbers are comparable, what
:data:`mococxr.report.compare.DIFFERS_MARK` means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from mococxr.data.splits import percent
from mococxr.report.compare import Comparison
from mococxr.report.describe import ReportContext
from mococxr.report.paper_tables import arch, baseline_name, lr_text
from mococxr.report.published import CORRECTIONS, PAPER_BATCH_SIZE, PAPER_LR, PAPER_REPLICATES, task_key
from mococxr.report.tables import PROTOCOL_ORDER

PROTOCOL_NAMES = {"linear": "Linear", "e2e": "End-to-end"}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _values(column: pd.Series) -> list[str]:
    return sorted({str(v) for v in column if str(v) not in ("", "None", "nan")})


def _numbers(column: pd.Series) -> list[float]:
    return sorted({float(x) for v in column for x in _NUMBER.findall(str(v))})


# --------------------------------------------------------------------------- lines common to both protocols


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def testset_line(context: ReportContext, params: pd.DataFrame) -> str:
    """The test set, the images scored in every cell, the runs' own ``n_test`` if it says otherwise."""
    logged = sorted({int(float(v)) for v in params.get("n_test", []) if _NUMBER.fullmatch(str(v))})
    said = "/".join(map(str, logged))
    extra = (
        ""
        if not logged
        else f" (every run logged n_test {said})"
        if logged == [context.n_test_images]
        else f"; the runs logged n_test {said}, but {context.n_test_images} images are scored in every cell"
    )
    return _sentence(f"{context.test_text()}{extra}; the paper does not name its test set")


_FRONTAL = {
    "true": "frontal views only (the paper pretrains on CheXpert, whose 224k images include laterals, and "
    "does not say it left them out)",
    "false": "frontal and lateral views (the whole training set)",
}


def pretraining_data_line(params: pd.DataFrame, notes) -> str | None:
    """Which images MoCo pretrained on: its pretraining runs' ``data.frontal_only``, else the fine-tune runs'.

    None where the plan's notes already say it (a line naming frontal images) or no init was pretrained.
    """
    if any("frontal" in x.lower() for x in notes.extra) or "init" not in params:
        return None
    mine = params[~params["init"].isin(("random", "imagenet"))]
    if mine.empty:
        return None
    for column, source in (
        ("pretrain.frontal_only", "of its pretraining runs"),
        ("data.frontal_only", "of the fine-tune runs; the pretraining runs were not found"),
    ):
        values = [v.lower() for v in _values(mine[column])]
        if values:
            said = "; ".join(_FRONTAL.get(v, v) for v in values)
            return f"MoCo pretraining images (data.frontal_only {source}): {said}."
    return "MoCo pretraining images: whether frontal only is not logged."


_POLICIES = {
    "ignore": "ignore (uncertain labels left out of the loss and the AUC)",
    "ones": "ones (uncertain labels counted as positive)",
    "zeros": "zeros (uncertain labels counted as negative)",
}


def policy_line(params: pd.DataFrame, dataset: str) -> str | None:
    """CheXpert's uncertainty policy (``data.policy``): the paper does not say how it treated uncertain
    labels."""
    if dataset != "chexpert":
        return None
    values = _values(params.get("data.policy", pd.Series(dtype=str)))
    said = "; ".join(_POLICIES.get(v, v) for v in values) or "not logged"
    return (
        f"Uncertainty policy (data.policy): {said}; the paper does not say how it treated uncertain labels."
    )


def protocol_lines(
    context: ReportContext,
    params: pd.DataFrame,
    absolute: pd.DataFrame,
    notes,
    *,
    n_replicates: int,
    paper_epochs: Mapping[float, int] | None,
    baseline: bool = True,
) -> list[str]:
    """Every caption line of a family beside its own title: the common lines, then one block per protocol
    (``notes``: a ``PaperNotes``; ``baseline``: whether the family compares with a baseline init)."""
    lines = [context.lines()[0], testset_line(context, params)]
    if context.phantom:
        lines.append(
            "Phantom data: synthetic images, not radiographs; the numbers check the pipeline, not MoCo-CXR."
        )
    lines += [x for x in (pretraining_data_line(params, notes), policy_line(params, context.dataset)) if x]
    lines.append(
        _sentence(context.draws_text()) + " The paper averages several random draws at small fractions "
        "without saying how many."
    )
    single = int(absolute["n_single_class"].max()) if len(absolute) else 0
    left_out = f"; {single} replicates holding one class were left out" if single else ""
    lines.append(
        f"{n_replicates} paired bootstrap replicates of the test images (the paper: {PAPER_REPLICATES}), "
        f"95% percentile intervals{left_out}."
    )
    lines.append(
        "MoCo pretraining started from ImageNet weights, as in the paper."
        if notes.moco_start == "imagenet"
        else f"MoCo pretraining started from {notes.moco_start} weights; the paper started from ImageNet."
    )
    if baseline:
        lines.append(
            "Baseline: ImageNet-pretrained, as in the paper."
            if notes.baseline == "imagenet"
            else f"Baseline: {baseline_name(notes.baseline)} (init {notes.baseline!r}); the paper's is "
            "ImageNet-pretrained."
        )
    lines += [_sentence(x) for x in notes.extra]
    lines += [f"Init {c}." for c in context.checkpoints]
    for protocol in [p for p in PROTOCOL_ORDER if p in set(params["protocol"])]:
        lines += protocol_block(protocol, params[params["protocol"] == protocol], paper_epochs)
    return lines


# --------------------------------------------------------------------------- one block per protocol


def protocol_block(
    protocol: str, params: pd.DataFrame, paper_epochs: Mapping[float, int] | None
) -> list[str]:
    """The lines of one protocol's runs, each prefixed with the protocol's name (``Linear head: ...``)."""
    linear = protocol == "linear"
    lines = [
        lr_line(params),
        epochs_line(params, paper_epochs),
        augmentation_line(params),
        head_line(params) if linear else None,
        validation_line(params),
        probe_gap_line(params) if linear else None,
        best_at_last_line(params),
    ]
    name = PROTOCOL_NAMES.get(protocol, protocol)
    return [f"{name} {x}" if x.startswith("head") else f"{name}: {x}" for x in lines if x]


def lr_line(params: pd.DataFrame) -> str:
    """The learning rate: fixed, or (linear ``linear_lr select``) chosen per run on validation, with
    counts."""
    sizes = [int(float(v)) for v in _numbers(params["batch_size"])]
    size = f"; batch size {'/'.join(map(str, sizes)) or 'not logged'}"
    select = params["linear_lr"].astype(str) == "select"
    parts = []
    if select.any():
        parts.append(_selected_lrs(params[select]))
    if (~select).any():
        lrs = _numbers(params.loc[~select, "lr"])
        parts.append(
            f"learning rate {', '.join(map(lr_text, lrs)) or 'not logged'}"
            + (f" in {_runs(int((~select).sum()))}" if select.any() else "")
        )
    same = _numbers(params["lr"]) == [PAPER_LR] and not select.any() and sizes == [PAPER_BATCH_SIZE]
    paper = (
        " (as the paper)" if same else f" (the paper: {lr_text(PAPER_LR)} and {PAPER_BATCH_SIZE}, one rate)"
    )
    return "; ".join(parts) + size + paper + "."


def _selected_lrs(params: pd.DataFrame) -> str:
    """``learning rate chosen per run on validation from {3e-5, 1e-4}: 3e-5 in 4 runs, 1e-4 in 20``."""
    candidates, chosen = set(_numbers(params["linear_lrs"])), []
    for logged, scores in zip(params["linear_lr_chosen"], params["lr_select"], strict=True):
        scores = scores if isinstance(scores, dict) else {}
        candidates |= set(scores)
        value = _numbers(pd.Series([logged]))
        chosen.append(value[0] if value else max(scores, key=scores.get) if scores else None)
    counts = pd.Series([c for c in chosen if c is not None], dtype=float).value_counts()
    said = ", ".join(f"{lr_text(lr)} in {_runs(n)}" for lr, n in sorted(counts.items()))
    missing = sum(c is None for c in chosen)
    said += f"{', ' if said else ''}not logged in {missing}" if missing else ""
    listed = (
        "{" + ", ".join(map(lr_text, sorted(candidates))) + "}" if candidates else "candidates not logged"
    )
    return (
        f"learning rate chosen per run (backbone x init x fraction x draw) on validation AUC from {listed}, "
        f"the test set read for the chosen one only: {said}"
    )


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


_RULES = {
    "fraction": "keyed to the label fraction, the paper's CheXpert rule",
    "size": "scaled with the size of the labelled set",
    "set": "set per fraction by the spec's epochs",
}


def _epoch_rules(params: pd.DataFrame) -> list[str]:
    """Each run's epoch rule: ``set`` where its ``epochs`` param fixed them, else its ``epochs_rule``."""
    if "epochs" not in params:
        return _values(params["epochs_rule"])
    fixed = params["epochs"].map(lambda v: str(v) not in ("", "None", "nan"))
    return _values(params["epochs_rule"].where(~fixed, "set"))


def epochs_line(params: pd.DataFrame, paper_epochs: Mapping[float, int] | None) -> str:
    """Epochs (and optimizer steps) per label fraction in numeric order, the rule, the paper's, any step
    floor."""
    per = []
    for fraction, group in sorted(params.groupby("fraction"), key=lambda kv: float(kv[0])):
        epochs = "/".join(f"{v:g}" for v in _numbers(group["epochs_resolved"])) or "not logged"
        steps = _numbers(group["optimizer_steps"])
        shown = (
            (f" ({steps[0]:,.0f}" + (f"-{steps[-1]:,.0f}" if len(steps) > 1 else "") + " steps)")
            if steps
            else ""
        )
        per.append(f"{percent(float(fraction))}: {epochs}{shown}")
    rules = _epoch_rules(params)
    said = [_RULES["set"] if r == "set" else f"epochs_rule {r}: {_RULES.get(r, r)}" for r in rules]
    rule = f" ({'; '.join(said)})" if said else ""
    paper = (
        "the paper: " + ", ".join(f"{percent(f)}: {e}" for f, e in sorted(paper_epochs.items()))
        if paper_epochs
        else "the paper gives none for this dataset"
    )
    line = f"epochs per label fraction{rule}: {', '.join(per)} ({paper})"
    floors = [f"{v:g}" for v in _numbers(params["min_steps"]) if v]
    if floors:
        line += f"; at least {'/'.join(floors)} optimizer steps per run (min_steps, not in the paper)"
    return line + "."


AUGMENTATIONS = {
    "cxr": "random rotation within 10 degrees and horizontal flip",
    "mocov2": "MoCo v2's crops and colour jitter",
    "none": "none (the eval resize only; linear heads train on cached frozen features)",
}


def augmentation_line(params: pd.DataFrame) -> str:
    """Fine-tune augmentation (runs that log no ``preset`` used ``cxr``): the paper does not say."""
    presets = sorted({str(v) or "cxr" for v in params["preset"]})
    said = "; ".join(AUGMENTATIONS.get(x, x) for x in presets)
    return f"augmentation {said} (preset {'/'.join(presets)}; the paper does not say whether it augmented)."


def head_line(params: pd.DataFrame) -> str | None:
    """The linear head: ``plain`` is the paper's; ``standardized`` (runs that log no ``head``) is not."""
    heads = params["head"].value_counts()
    if heads.empty:
        return None
    if len(heads) > 1:
        return "heads differ between runs: " + ", ".join(f"{h} in {n} runs" for h, n in heads.items()) + "."
    if heads.index[0] == "plain":
        return "head: a plain linear layer on the frozen features, as in the paper."
    return (
        f"head: {heads.index[0]}, unlike the paper: the frozen features are standardised (a parameter-free "
        "BatchNorm) before the linear layer."
    )


def validation_line(params: pd.DataFrame) -> str:
    """When the runs validated (``val_every``; runs that log none validated every epoch)."""
    values = sorted({int(v) for v in params["val_every"] if str(v).isdigit()} or {1})
    every = (
        "every epoch" if values == [1] else f"every {'/'.join(map(str, values))} epochs and after the last"
    )
    return (
        f"validated {every}; the epoch of best validation AUC scores the test set (the paper states no "
        "validation cadence)."
    )


def probe_gap_line(params: pd.DataFrame) -> str | None:
    """The largest ``val/probe_gap``: how far a run's head is below a converged linear probe on its
    features."""
    gaps = params[pd.to_numeric(params["probe_gap"], errors="coerce").notna()]
    if gaps.empty:
        return None
    top = gaps.loc[pd.to_numeric(gaps["probe_gap"]).idxmax()]
    cell = " ".join(
        str(x)
        for x in (
            arch(top.get("backbone", "")),
            top.get("init", ""),
            percent(float(top["fraction"])) if "fraction" in top else "",
            f"draw {top['draw']}" if "draw" in top else "",
        )
        if x
    )
    return (
        f"largest probe gap {float(top['probe_gap']):+.3f} ({cell}; val/probe_gap: validation AUC of a "
        "logistic regression on the same frozen features minus the run's own; > 0: the head fell short of "
        f"it), over {len(gaps)} runs."
    )


def best_at_last_line(params: pd.DataFrame) -> str | None:
    """How many runs were best at their last validated epoch (they may still have been improving)."""
    flags = [f for f in params["best_at_last"] if f is not None]
    if not flags:
        return None
    missing = len(params) - len(flags)
    unlogged = f"; not logged in {missing}" if missing else ""
    return (
        f"the best validation epoch was the last one in {sum(flags)} of {len(flags)} runs{unlogged} (such a "
        "run may still have been improving)."
    )


# --------------------------------------------------------------------------- the published columns


def comparable_reasons(notes, *, phantom: bool, baseline: bool = True) -> list[str]:
    """Why the published numbers cannot be compared with these runs (empty: they can)."""
    reasons = ["these runs are on synthetic phantom images, the paper's on radiographs"] if phantom else []
    if notes.moco_start != "imagenet":
        reasons.append(
            f"our MoCo pretraining started from {notes.moco_start} weights, the paper's from ImageNet"
        )
    if baseline and notes.baseline != "imagenet":
        reasons.append(f"our baseline is {baseline_name(notes.baseline)}, the paper's ImageNet-pretrained")
    return reasons


def comparison_for(notes, *, phantom: bool, baseline: bool = True) -> Comparison | None:
    """A table's mark counter where its numbers compare with the paper's; None (no marks) where not."""
    return None if comparable_reasons(notes, phantom=phantom, baseline=baseline) else Comparison()


def corrections_line(item: str, tasks: Sequence[str] | None = None) -> str | None:
    """The footnote naming the published cells of ``item`` (of ``tasks``, None: all) that differ from what the
    paper prints there."""
    keys = None if tasks is None else {task_key(t) for t in tasks}
    fixed = [c for c in CORRECTIONS if c.item == item and (keys is None or task_key(c.task) in keys)]
    if not fixed:
        return None
    said = "; ".join(
        f"{c.task}, {percent(c.fraction)}, {c.column}: printed ({c.printed.lo:.3f}, {c.printed.hi:.3f}), "
        f"used ({c.used.lo:.3f}, {c.used.hi:.3f}) from {c.source}"
        for c in fixed
    )
    return (
        f"Corrected published cells: {item} prints these intervals otherwise than the table that reports the "
        f"same models, whose numbers are compared here: {said}."
    )


def published_lines(
    item: str,
    notes,
    *,
    phantom: bool,
    baseline: bool = True,
    comparison: Comparison | None = None,
    tasks: Sequence[str] | None = None,
) -> list[str]:
    """What the ``paper ...`` columns hold, whether they compare, corrected cells, and the mark's legend.

    No mark line where the numbers are not comparable (:func:`comparable_reasons`): the layouts print no
    mark there either.
    """
    lines = [
        f"Columns headed 'paper ...' hold the published numbers of the paper's {item}, after ours; a blank "
        "paper cell: the paper has no number there, a blank cell of ours: our runs lack that fraction."
    ]
    reasons = comparable_reasons(notes, phantom=phantom, baseline=baseline)
    if reasons:
        lines.append(
            f"The published numbers are shown for layout only and are not comparable with these runs: "
            f"{'; '.join(reasons)}; no cell is marked."
        )
    lines += [x for x in (corrections_line(item, tasks),) if x]
    if not reasons and comparison is not None:
        lines.append(comparison.caption())
    return lines


def caption_markdown(lines: Sequence[str]) -> str:
    """Caption lines as the Markdown list that opens each item."""
    return "\n".join(f"- {line}" for line in lines)
