"""What a plan's test sets can resolve, before anything is trained: for each paired AUC difference the
paper reports, the expected 95 % CI half-width at the plan's test-set size and prevalence, beside the
paper's published effect, so a user sees whether the paper's effects can reach significance there.

The simulation, stated in what :func:`power_lines` prints:

- Two arms per comparison (MoCo and its ImageNet baseline) score the test images with binormal,
  equal-variance scores whose AUCs are the paper's published ones (positive mean ``sqrt(2) * Phi^-1(AUC)``),
  their noise correlated ``rho`` given the label.
- ``SETS`` test sets of the plan's size and positives are drawn; each is scored with the project's own
  paired bootstrap (:func:`mococxr.report.bootstrap.paired_bootstrap`, ``REPLICATES`` replicates), and
  the half-width ``(hi - lo) / 2`` of the MoCo - baseline interval is averaged over the sets. One draw
  per arm (the paper averages several at small fractions, which narrows its intervals a little).
- Above ``N_SIM`` images the sets have ``N_SIM`` images at the same prevalence and the half-width is
  scaled by ``sqrt(N_SIM / n)`` (the bootstrap's half-width falls as ``1/sqrt(n)`` at fixed prevalence).
- ``rho`` per kind of comparison (:data:`RHO`) is the median of the values that reproduce each of the
  paper's Table 1 intervals with this simulation at its test set (CheXpert valid.csv: 234 images, 67
  with pleural effusion): end-to-end pairs are far more correlated than linear ones. The paper does not
  say how large its Shenzhen test set was, so Shenzhen uses the same values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import norm

from mococxr.data.splits import percent
from mococxr.report.bootstrap import paired_bootstrap
from mococxr.report.published import (
    APPENDIX_TABLE1,
    APPENDIX_TABLE2,
    APPENDIX_TABLE3,
    CHEXPERT_FRACTIONS,
    COMPETITION,
    SHENZHEN_FRACTIONS,
    TABLE1,
    TABLE2,
    Published,
    task_key,
)
from mococxr.report.tables import COMPARISONS

SETS = 10
REPLICATES = 200
N_SIM = 2000
SEED = 0
RHO = {("e2e", "e2e"): 0.96, ("linear", "linear"): 0.80, ("linear", "e2e"): 0.92}
ARCH = {"resnet18": "ResNet18", "densenet121": "DenseNet121"}

Arm = tuple[float, float, float]  # (baseline AUC, MoCo AUC, rho)


def half_widths(
    arms: Sequence[Arm],
    n: int,
    positives: int,
    *,
    sets: int = SETS,
    replicates: int = REPLICATES,
    seed: int = SEED,
) -> list[float]:
    """Expected 95 % half-width of the paired AUC difference of each (baseline AUC, MoCo AUC, rho) pair on
    test sets of ``n`` images with ``positives`` positives (see the module docstring)."""
    if not 0 < positives < n:
        return [math.nan] * len(arms)
    m = min(n, N_SIM)
    pos = max(1, min(m - 1, round(positives * m / n)))
    y = np.zeros(m, dtype=bool)
    y[:pos] = True
    shift = [(math.sqrt(2) * norm.ppf(a), math.sqrt(2) * norm.ppf(b), rho) for a, b, rho in arms]
    rng = np.random.default_rng(seed)
    widths = np.zeros((sets, len(arms)))
    for s in range(sets):
        scores = {}
        for j, (da, db, rho) in enumerate(shift):
            z = rng.standard_normal((2, m))
            scores[f"b{j}"] = da * y + z[0]
            scores[f"m{j}"] = db * y + rho * z[0] + math.sqrt(1 - rho * rho) * z[1]
        result = paired_bootstrap(y, scores, n_replicates=replicates, seed=seed + s, metrics=("auc",))
        for j in range(len(arms)):
            d = result.diff(f"m{j}", f"b{j}")
            widths[s, j] = (d.hi - d.lo) / 2
    return list(widths.mean(axis=0) * math.sqrt(m / n))


def _cell(effect: float, hw: float) -> str:
    if math.isnan(hw):
        return f"{effect:+.3f}    n/a "
    return f"{effect:+.3f} ±{hw:.3f}{'*' if abs(effect) > hw else ' '}"


def _block(
    title: str,
    test: tuple[int, int],
    rows: list[tuple[str, list[tuple[Published, Arm]]]],
    columns: Sequence[str],
    seed: int,
    *,
    paper: bool = True,
) -> list[str]:
    """One family: a title line, then per row the published effect and expected half-width per column."""
    n, positives = test
    arms = [arm for _, cells in rows for _, arm in cells]
    widths = iter(half_widths(arms, n, positives, seed=seed))
    title = f"{title}: {n} test images, {positives} positive"
    if paper:
        published = [(p.hi - p.lo) / 2 for _, cells in rows for p, _ in cells]
        title += f"; the paper's own half-widths {min(published):.3f}-{max(published):.3f}"
    out = [title, f"  {'':<44}" + "".join(f"{c:>16}" for c in columns)]
    for label, cells in rows:
        out.append(f"  {label:<44}" + "".join(f"{_cell(p.point, next(widths)):>16}" for p, _ in cells))
    return out


def _improvement_rows(
    backbones: Sequence[str], effects: Mapping, aucs: Mapping, fractions: Sequence[float]
) -> list[tuple[str, list[tuple[Published, Arm]]]]:
    rows = []
    for backbone in backbones:
        for pm, pb in COMPARISONS:
            if (backbone, pm, pb, fractions[0]) not in effects:
                continue
            cells = [
                (
                    effects[(backbone, pm, pb, f)],
                    (
                        aucs[(backbone, "imagenet", pb, f)].point,
                        aucs[(backbone, "moco", pm, f)].point,
                        RHO[(pm, pb)],
                    ),
                )
                for f in fractions
            ]
            rows.append((f"{ARCH.get(backbone, backbone)} MoCo {pm} vs ImageNet {pb}", cells))
    return rows


def _competition_rows(task: str) -> list[tuple[str, list[tuple[Published, Arm]]]]:
    out = []
    for protocol in ("linear", "e2e"):
        cells = [
            (v["improvement"], (v["baseline"].point, v["moco"].point, RHO[(protocol, protocol)]))
            for (t, p, _), v in COMPETITION.items()
            if task_key(t) == task_key(task) and p == protocol
        ]
        if cells:
            out.append((f"ResNet18 MoCo {protocol} vs ImageNet {protocol}", cells))
    return out


def power_lines(plan, tests: Mapping[str, Mapping[str, tuple[int, int]]]) -> list[str]:
    """What ``--plan`` prints about the plan's test sets. ``tests``: family (chexpert, shenzhen, table2,
    competition) -> task -> (labelled test images, positives), as :func:`mococxr.sweep.cost.power_inputs`
    gives it; families the paper has no effects for are left out."""
    out = [
        "WHAT THE TEST SETS CAN RESOLVE: each paired AUC difference the paper reports (MoCo - ImageNet; "
        "Table 2: each lr - 1e-4) as 'published effect ±expected 95 % CI half-width at this plan's test "
        "set'; * marks an effect larger than the half-width (its interval is expected to exclude 0).",
        "  Simulation: binormal scores with the paper's AUCs, noise correlation rho = "
        + ", ".join(f"{a}/{b} {r:.2f}" for (a, b), r in RHO.items())
        + " (medians that reproduce the paper's Table 1 intervals at its 234-image test set); "
        f"{SETS} test sets x {REPLICATES} paired-bootstrap replicates (mococxr.report.bootstrap); one "
        f"draw per arm; above {N_SIM:,} images simulated at {N_SIM:,} and scaled by sqrt({N_SIM:,}/n).",
    ]
    grids = getattr(plan, "grids", {})
    for seed, (family, title, effects, aucs, fractions) in enumerate(
        (
            ("chexpert", "Table 1 (CheXpert)", TABLE1, APPENDIX_TABLE1, CHEXPERT_FRACTIONS),
            ("shenzhen", "Appendix Table 3 (Shenzhen)", APPENDIX_TABLE3, APPENDIX_TABLE2, SHENZHEN_FRACTIONS),
        )
    ):
        for task, test in tests.get(family, {}).items():
            backbones = grids[family].backbones if family in grids else tuple(ARCH)
            rows = _improvement_rows(backbones, effects, aucs, fractions)
            if rows:
                out += _block(f"{title}, {task}", test, rows, [percent(f) for f in fractions], SEED + seed)
    for task, test in tests.get("table2", {}).items():
        best, rho = TABLE2[1e-4], RHO[("linear", "linear")]
        cells = [(_diff(TABLE2[lr], best), (best.point, TABLE2[lr].point, rho)) for lr in (1e-2, 1e-3, 1e-5)]
        out += _block(
            f"Table 2 (Shenzhen, pretraining lr; the paper gives no interval for these differences), {task}",
            test,
            [("ResNet18 linear 100%: lr vs lr 1e-4", cells)],
            ["lr 1e-2", "lr 1e-3", "lr 1e-5"],
            SEED + 2,
            paper=False,
        )
    for task, test in tests.get("competition", {}).items():
        rows = _competition_rows(task)
        if rows:
            out += _block(
                f"Appendix Tables 4-5 (CheXpert competition), {task}",
                test,
                rows,
                [percent(f) for f in CHEXPERT_FRACTIONS],
                SEED + 3,
            )
    return out


def _diff(a: Published, b: Published) -> Published:
    """The point difference of two published AUCs (the paper prints no interval for it)."""
    return Published(a.point - b.point, math.nan, math.nan)


__all__ = ["N_SIM", "REPLICATES", "RHO", "SETS", "half_widths", "power_lines"]
