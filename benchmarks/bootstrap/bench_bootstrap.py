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
import os
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from mococxr.report.bootstrap import indices_to_counts, paired_bootstrap

# reference-loop subset per n: (cells, replicates); the full table is 24 cells x 500 replicates
LOOP_SUBSET = {234: (2, 500), 2000: (2, 250), 20000: (1, 50)}


def make_table(n: int, cells: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels at 30 % prevalence and ``cells`` float32 sigmoid outputs of varying quality."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    scores = {}
    for k in range(cells):
        logit = rng.normal(size=n) + (0.5 + 1.5 * k / cells) * y
        scores[f"cell{k:02d}"] = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32).astype(np.float64)
    return y, scores


def timed(fn) -> tuple[float, float, object]:
    """Wall and CPU seconds of one call (CPU time is the fairer figure on a shared, loaded machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def best_of(fn, repeats: int) -> tuple[float, float, object]:
    runs = [timed(fn) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[-1][2]


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

    print(
        f"{args.cells} cells x {args.replicates} paired replicates, AUC + AUPRC per cell and replicate; "
        f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'n':>6} {'vectorized wall/cpu s':>22} {'loop subset':>12} {'loop wall/cpu s':>16} "
        f"{'loop full wall/cpu s':>21} {'speed-up wall/cpu':>18} {'max |diff|':>11}"
    )
    for n in args.sizes:
        y, scores = make_table(n, args.cells, seed=n)
        idx = np.random.default_rng(0).integers(0, n, size=(args.replicates, n))
        counts = indices_to_counts(idx, n)

        def vectorized(y=y, scores=scores, counts=counts):
            return paired_bootstrap(y, scores, counts=counts)

        v_wall, v_cpu, res = best_of(vectorized, args.repeats)

        sub_cells, sub_reps = LOOP_SUBSET.get(n, (2, 100))
        sub_cells, sub_reps = min(sub_cells, args.cells), min(sub_reps, args.replicates)
        names = list(scores)[:sub_cells]
        subset = {k: scores[k] for k in names}
        l_wall, l_cpu, ref = timed(lambda: sklearn_loop(y, subset, idx[:sub_reps]))  # noqa: B023
        scale = (args.cells * args.replicates) / (sub_cells * sub_reps)

        err = max(
            max(
                np.abs(res.replicates["auc"][k][:sub_reps] - ref[k][:, 0]).max(),
                np.abs(res.replicates["auprc"][k][:sub_reps] - ref[k][:, 1]).max(),
            )
            for k in names
        )
        if not err <= 1e-12:
            raise SystemExit(f"n={n}: vectorized and sklearn disagree by {err:.3g}")
        cols = [
            f"{v_wall:.3f} / {v_cpu:.3f}",
            f"{sub_cells}x{sub_reps}",
            f"{l_wall:.2f} / {l_cpu:.2f}",
            f"{l_wall * scale:.1f} / {l_cpu * scale:.1f}",
            f"{l_wall * scale / v_wall:.0f}x / {l_cpu * scale / v_cpu:.0f}x",
        ]
        print(f"{n:>6} {cols[0]:>22} {cols[1]:>12} {cols[2]:>16} {cols[3]:>21} {cols[4]:>18} {err:>11.1e}")
    print(
        "vectorized: best of --repeats runs of paired_bootstrap over the whole table (all cells and "
        "replicates, with point estimates).\nloop: per-replicate roc_auc_score + average_precision_score "
        "timed on the subset (cells x replicates) and scaled linearly to the whole table."
    )


if __name__ == "__main__":
    main()
