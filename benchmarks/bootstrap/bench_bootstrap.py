"""Paired bootstrap of a 24-cell table: vectorized counts vs the per-replicate scikit-learn loop.

For each test-set size, one set of 500 resamples is drawn and applied to 24 models' score vectors
(a paper-style table: 24 cells sharing one test set). The vectorized path is
``mococxr.report.bootstrap.paired_bootstrap`` (AUC + AUPRC for every cell and replicate, plus the
full-set point estimates). The reference is what the MoCo-CXR code does: for every cell and every
replicate, index the arrays and call ``roc_auc_score`` and ``average_precision_score``. The loop is
timed on a subset of cells x replicates and extrapolated linearly to the full table (the output
says which subset); on that subset the two must agree to 1e-12.

    .venv/bin/python benchmarks/bootstrap/bench_bootstrap.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from mococxr.report.bootstrap import indices_to_counts, paired_bootstrap

# reference-loop subset per n: (cells, replicates); the full table is 24 cells x 500 replicates
LOOP_SUBSET = {234: (4, 500), 2000: (2, 250), 20000: (1, 50)}


def make_table(n: int, cells: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels at 30 % prevalence and ``cells`` float32 sigmoid outputs of varying quality."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    scores = {}
    for k in range(cells):
        logit = rng.normal(size=n) + (0.5 + 1.5 * k / cells) * y
        scores[f"cell{k:02d}"] = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32).astype(np.float64)
    return y, scores


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sklearn_loop(y, scores: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, s in scores.items():
        out[name] = np.array([[roc_auc_score(y[i], s[i]), average_precision_score(y[i], s[i])] for i in idx])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[234, 2000, 20000])
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--replicates", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3, help="vectorized timing: best of this many runs")
    args = ap.parse_args()

    print(f"{args.cells} cells x {args.replicates} paired replicates, AUC + AUPRC per cell and replicate")
    header = (f"{'n':>6} {'vectorized s':>13} {'per cell ms':>12} {'loop subset':>14} {'loop s':>8} "
              f"{'loop full s (extrap.)':>22} {'speed-up':>9} {'max |diff|':>11}")
    print(header)
    for n in args.sizes:
        y, scores = make_table(n, args.cells, seed=n)
        idx = np.random.default_rng(0).integers(0, n, size=(args.replicates, n))
        counts = indices_to_counts(idx, n)

        t_vec, res = best_of(lambda: paired_bootstrap(y, scores, counts=counts), args.repeats)  # noqa: B023

        sub_cells, sub_reps = LOOP_SUBSET.get(n, (2, 100))
        sub_cells, sub_reps = min(sub_cells, args.cells), min(sub_reps, args.replicates)
        names = list(scores)[:sub_cells]
        t0 = time.perf_counter()
        ref = sklearn_loop(y, {k: scores[k] for k in names}, idx[:sub_reps])
        t_loop = time.perf_counter() - t0
        t_full = t_loop * (args.cells * args.replicates) / (sub_cells * sub_reps)

        err = max(
            max(np.abs(res.replicates["auc"][k][:sub_reps] - ref[k][:, 0]).max(),
                np.abs(res.replicates["auprc"][k][:sub_reps] - ref[k][:, 1]).max())
            for k in names
        )
        if not err <= 1e-12:
            raise SystemExit(f"n={n}: vectorized and sklearn disagree by {err:.3g}")
        subset = f"{sub_cells}x{sub_reps}"
        print(f"{n:>6} {t_vec:>13.3f} {1e3 * t_vec / args.cells:>12.2f} {subset:>14} {t_loop:>8.2f} "
              f"{t_full:>22.1f} {t_full / t_vec:>8.0f}x {err:>11.1e}")
    print("loop full = loop time on the subset (cells x replicates) scaled linearly to the whole table; "
          "vectorized = best of --repeats runs of paired_bootstrap over the whole table.")


if __name__ == "__main__":
    main()
