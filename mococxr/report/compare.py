"""Whether one of our numbers and the published one differ, using both 95% intervals.

Each interval is read as a normal one: its standard error is its width over 2 x 1.96, and the two
numbers differ at the 5% level when ``|ours - published| / sqrt(se_ours^2 + se_published^2) > 1.96``.
Two studies measuring the same thing on independent test sets are then marked in about 5% of the cells
they share (an interval that merely misses the other's point fires far more often: ~9-17%). A
published number without an interval (missing, or zero width as printed) is not compared: no mark,
and the cell is not counted.

:data:`DIFFERS_MARK` is the one symbol the paper layouts print; :class:`Comparison` marks the cells of
one table and says in its caption line what the mark means and how many marks chance alone would make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIFFERS_MARK = "≠"  # our number and the published one differ at the 5% level (see differs)
Z_95 = 1.959963984540054  # two-sided 5% point of the standard normal
ALPHA = 0.05


def interval_se(lo: float, hi: float) -> float | None:
    """The standard error a 95% interval implies if it is normal: (hi - lo) / (2 x 1.96); None: no
    interval."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        return None
    return (hi - lo) / (2 * Z_95)


def z_difference(ours: tuple[float, float, float], published: tuple[float, float, float]) -> float | None:
    """z of ``ours - published``, each a ``(point, lo, hi)``; None when the published number has no interval
    (or either is not a number). Our interval may be zero wide (every bootstrap replicate alike)."""
    (p1, lo1, hi1), (p2, lo2, hi2) = ours, published
    se1, se2 = interval_se(lo1, hi1), interval_se(lo2, hi2)
    if se1 is None or not se2 or not (math.isfinite(p1) and math.isfinite(p2)):
        return None
    return (p1 - p2) / math.sqrt(se1**2 + se2**2)


def differs(ours: tuple[float, float, float], published: tuple[float, float, float]) -> bool | None:
    """Whether the two numbers differ at the 5% level (``|z| > 1.96``); None: not compared."""
    z = z_difference(ours, published)
    return None if z is None else abs(z) > Z_95


@dataclass
class Comparison:
    """The cells of one table compared with the paper: how many, and how many differ."""

    compared: int = 0
    marked: int = 0

    def mark(
        self, ours: tuple[float, float, float] | None, published: tuple[float, float, float] | None
    ) -> str:
        """``" ≠"`` where the two differ, else ``""``; counts every cell it could compare."""
        if ours is None or published is None:
            return ""
        verdict = differs(ours, published)
        if verdict is None:
            return ""
        self.compared += 1
        self.marked += verdict
        return f" {DIFFERS_MARK}" if verdict else ""

    def caption(self) -> str:
        """What the mark means, and how often it would fire by chance in this table."""
        if not self.compared:
            return (
                f"No cell of ours has a published number with an interval beside it: no {DIFFERS_MARK} marks."
            )
        expected = ALPHA * self.compared
        return (
            f"{DIFFERS_MARK} after a published number: it and ours differ at the 5% level, from both 95% "
            f"intervals (each read as normal, SE = width / 3.92; |difference| / sqrt(SE_ours^2 + SE_paper^2) "
            f"> 1.96). {self.compared} cells compared, so about {expected:.1f} would be marked by chance "
            f"alone if both studies measured the same thing on independent test sets; {self.marked} marked. "
            "Published numbers without an interval are not compared."
        )
