"""Throughput here, for ``--plan``: the median of several short timings, and how far they spread.

One timing is as many Adam steps (or no-grad forwards) of the backbone and a linear head, on noise at
the plan's image size, as last a quarter of a second, after a warm-up step. A single timing on a shared
machine can be off by tens of per cent, so :func:`measure` takes at least ``repeats`` timings of each and
keeps taking them (up to ``max_repeats``) while they spread more than ``tolerance`` around their median;
the rate is the median and the spread (min and max relative to it) is reported with it, so a reader
knows whether to trust it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

TOLERANCE = 0.10  # the spread --plan calls stable: every timing within +-10 % of the median


@dataclass(frozen=True)
class Timing:
    """A throughput (img/s): the median of ``n`` timings, and the lowest and highest relative to it."""

    rate: float
    low: float  # min / median - 1 (<= 0)
    high: float  # max / median - 1 (>= 0)
    n: int

    @classmethod
    def of(cls, rates: list[float]) -> Timing:
        med = statistics.median(rates)
        return cls(med, min(rates) / med - 1, max(rates) / med - 1, len(rates))

    def within(self, tolerance: float = TOLERANCE) -> bool:
        """Every timing within ``tolerance`` of the median."""
        return max(-self.low, self.high) <= tolerance

    @property
    def stable(self) -> bool:
        return self.within(TOLERANCE)

    def describe(self) -> str:
        verdict = "within" if self.stable else "NOT within"
        return (
            f"median of {self.n} timings, spread {100 * self.low:+.0f} %/{100 * self.high:+.0f} %: "
            f"{verdict} +-{100 * TOLERANCE:.0f} %"
        )


@dataclass(frozen=True)
class Rate:
    """Training and inference throughput of one backbone at one image size, measured here."""

    train: Timing
    infer: Timing

    @property
    def img_s(self) -> tuple[float, float]:
        return self.train.rate, self.infer.rate


def timings(
    fn: Callable[[], None],
    images: int,
    *,
    repeats: int = 5,
    max_repeats: int = 9,
    tolerance: float = TOLERANCE,
    min_seconds: float = 0.25,
) -> Timing:
    """``images / seconds`` of ``fn`` (one call processes ``images``): one warm-up call, then ``repeats``
    timings of as many calls as last ``min_seconds``, and more timings (up to ``max_repeats``) while
    they spread more than ``tolerance`` around their median."""
    t0 = time.perf_counter()
    fn()  # warm-up: allocator, kernels, caches; its time sizes a timing
    calls = max(1, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    rates: list[float] = []
    while len(rates) < repeats or (len(rates) < max_repeats and not Timing.of(rates).within(tolerance)):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(images * calls / (time.perf_counter() - t0))
    return Timing.of(rates)


def measure(backbone: str, image_size: int, *, batch: int = 8, repeats: int = 5) -> Rate:
    """Training (Adam steps) and inference (no-grad forwards) img/s of ``backbone`` here, on noise."""
    import torch

    from mococxr.models.backbones import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(backbone, init="random")
    model = torch.nn.Sequential(enc, torch.nn.Linear(enc.feature_dim, 1))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, image_size, image_size).to(memory_format=torch.channels_last)

    def train() -> None:
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    trained = timings(train, batch, repeats=repeats)
    model.eval()
    return Rate(trained, timings(infer, batch, repeats=repeats))


__all__ = ["TOLERANCE", "Rate", "Timing", "measure", "timings"]
