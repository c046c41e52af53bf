"""What a paired bootstrap returns: the replicate metrics, and the intervals and differences read from them.

Intervals are percentile intervals over the replicates that hold both classes (numpy's default
linear interpolation); a paired difference subtracts two models replicate by replicate, so it
reflects the models and not the luck of two different resamples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mococxr.errors import DataError


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    point: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Difference:
    """``a - b`` on one metric: point difference, its interval, and how often ``a`` beat ``b``.

    ``frac_greater`` is the fraction of the replicates holding both classes where ``a > b`` strictly
    (a tie counts as not greater).
    """

    a: str
    b: str
    metric: str
    point: float
    lo: float
    hi: float
    frac_greater: float


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap over one test set: every model was scored on the same replicates.

    ``point[metric][name]`` is the metric on the full test set (averaged across draws),
    ``replicates[metric][name]`` the ``[R]`` replicate values (averaged across draws per replicate,
    NaN for single-class replicates), ``single_class`` the ``[R]`` mask of excluded replicates.
    """

    names: tuple[str, ...]
    metrics: tuple[str, ...]
    ci: float
    point: dict[str, dict[str, float]]
    replicates: dict[str, dict[str, np.ndarray]]
    single_class: np.ndarray
    n_draws: dict[str, int] = field(default_factory=dict)

    @property
    def n_replicates(self) -> int:
        return int(self.single_class.size)

    @property
    def n_single_class(self) -> int:
        return int(self.single_class.sum())

    def _bounds(self, values: np.ndarray) -> tuple[float, float]:
        valid = values[~self.single_class]
        if valid.size == 0:
            return float("nan"), float("nan")
        alpha = round(50.0 * (1.0 - self.ci), 10)  # 2.5 for ci=0.95, not 2.4999999999999996
        lo, hi = np.percentile(valid, [alpha, 100.0 - alpha])
        return float(lo), float(hi)

    def _check(self, name: str, metric: str) -> None:
        if metric not in self.metrics:
            raise DataError(f"bootstrap: metric {metric!r} was not computed; have {list(self.metrics)}")
        if name not in self.names:
            raise DataError(f"bootstrap: unknown model {name!r}; have {list(self.names)}")

    def interval(self, name: str, metric: str = "auc") -> Interval:
        """Point estimate and percentile interval of one model on one metric."""
        self._check(name, metric)
        return Interval(self.point[metric][name], *self._bounds(self.replicates[metric][name]))

    def diff(self, a: str, b: str, metric: str = "auc") -> Difference:
        """Paired difference ``a - b``: the same replicates are subtracted one by one."""
        self._check(a, metric)
        self._check(b, metric)
        d = self.replicates[metric][a] - self.replicates[metric][b]
        valid = d[~self.single_class]
        frac = float((valid > 0).mean()) if valid.size else float("nan")
        point = self.point[metric][a] - self.point[metric][b]
        return Difference(a, b, metric, point, *self._bounds(d), frac_greater=frac)

    def summary(self) -> list[dict]:
        """One row per model and metric (``pandas.DataFrame(result.summary())`` makes the table)."""
        rows = []
        for metric in self.metrics:
            for name in self.names:
                iv = self.interval(name, metric)
                rows.append(
                    {
                        "model": name,
                        "metric": metric,
                        "point": iv.point,
                        "lo": iv.lo,
                        "hi": iv.hi,
                        "n_draws": self.n_draws.get(name, 1),
                        "n_replicates": self.n_replicates,
                        "n_single_class": self.n_single_class,
                    }
                )
        return rows
