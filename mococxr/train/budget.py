"""How long a fine-tune run trains and when it validates: MoCo-CXR's label-fraction epochs, a floor in
optimizer steps, and the validation cadence.

The paper trains CheXpert runs for 220/95/41/18 epochs at 0.1/1/10/100 % labels; other fractions
interpolate in log10(fraction). ``min_steps`` raises the epochs of a tiny draw until it makes that
many optimizer steps. ``val_every`` validates every K epochs and always after the last, so the best
epoch is the best of the validated ones (the paper states no cadence; K=1 is every epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mococxr.config import FinetuneConfig
from mococxr.errors import ConfigError

# MoCo-CXR's CheXpert schedule: label fraction -> epochs. Other fractions interpolate linearly in
# log10(fraction) between these points and clamp outside them (0.05 % -> 220, 5 % -> 57, 50 % -> 25).
FRACTION_EPOCHS = ((0.001, 220), (0.01, 95), (0.1, 41), (1.0, 18))


def epochs_for_fraction(fraction: float) -> int:
    """The paper's epochs for a label fraction (see ``FRACTION_EPOCHS`` for the rule)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    xs = [math.log10(f) for f, _ in FRACTION_EPOCHS]
    ys = [e for _, e in FRACTION_EPOCHS]
    return int(round(float(np.interp(math.log10(fraction), xs, ys))))


@dataclass(frozen=True)
class Budget:
    """How long a run trains: its epochs, the optimizer steps they make, and the rule that decided.

    ``rule_epochs`` come from ``--epochs`` when set, else from MoCo-CXR's label-fraction schedule (times
    ``epochs_scale``); ``min_steps`` is a floor on top of either: the run trains
    ``max(rule_epochs, ceil(min_steps / steps_per_epoch))`` epochs. ``steps_per_epoch`` is what the
    train loader yields (see :func:`train_loader`), so a tiny draw trains long enough to converge.
    """

    epochs: int
    steps_per_epoch: int
    rule_epochs: int
    rule: str
    min_steps: int = 0

    @property
    def optimizer_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def params(self) -> dict[str, int]:
        return {"epochs_resolved": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "optimizer_steps": self.optimizer_steps}

    def describe(self) -> str:
        steps = f"{self.optimizer_steps} optimizer steps, {self.steps_per_epoch} per epoch"
        if self.epochs > self.rule_epochs:
            return f"{self.epochs} (min_steps {self.min_steps} raised them from {self.rule_epochs}, {self.rule}); {steps}"
        met = f"; min_steps {self.min_steps} already met" if self.min_steps else ""
        return f"{self.epochs} ({self.rule}{met}); {steps}"


def training_budget(cfg: FinetuneConfig, steps_per_epoch: int) -> Budget:
    """The :class:`Budget` of ``cfg`` for a train loader of ``steps_per_epoch`` batches."""
    if cfg.epochs:
        rule_epochs, rule = cfg.epochs, "set by --epochs"
    else:
        rule_epochs, rule = max(1, int(round(epochs_for_fraction(cfg.fraction) * cfg.epochs_scale))), _epoch_rule(cfg)
    steps_per_epoch = max(1, steps_per_epoch)
    epochs = max(rule_epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    return Budget(epochs, steps_per_epoch, rule_epochs, rule, cfg.min_steps)


def _epoch_rule(cfg: FinetuneConfig) -> str:
    scale = f" x epochs_scale {cfg.epochs_scale:g}" if cfg.epochs_scale != 1 else ""
    return f"MoCo-CXR's label-fraction schedule for {percent(cfg.fraction)}{scale}"


def percent(fraction: float) -> str:
    """0.1 -> '10%', 0.001 -> '0.1%'."""
    return f"{round(100 * fraction, 6):g}%"


def validation_epochs(epochs: int, every: int) -> list[int]:
    """The epochs (1-based) after which a run of ``epochs`` validates: every ``every``-th and the last."""
    every = max(1, every)
    return sorted({e for e in range(every, epochs + 1, every)} | {epochs})
