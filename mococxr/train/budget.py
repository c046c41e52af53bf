"""How long a fine-tune run trains and when it validates: MoCo-CXR's epochs by label fraction or by the
size of the labelled set, a floor in optimizer steps, and the validation cadence.

The paper trains CheXpert runs for 220/95/41/18 epochs at 0.1/1/10/100 % labels, epochs that scale
with the size of the labelled data. Rule ``fraction`` (``epochs_rule``, the default) keys them to the
label fraction: other fractions interpolate in log10(fraction), and a small dataset gets CheXpert's epochs
at the same fraction (Shenzhen 6.25 %, 29 images: 52 epochs of one step). Rule ``size`` keys them to the
number of labelled training images n, with CheXpert's points at n = fraction x ``CHEXPERT_LABELLED``: a
CheXpert run gets the paper's 220/95/41/18, and Shenzhen (about 29/116/463 labelled images at
6.25/25/100 %, all within 3x of CheXpert's 0.1 % draw, 172) trains 220/220/167 epochs: at batch 16,
220/1,540/~4,700 optimizer steps, which scale with its size. ``min_steps`` raises the epochs of a tiny
draw until it makes that many optimizer steps, under either rule and either protocol. ``val_every``
validates every K epochs and always after the last, so the best epoch is the best of the validated ones
(the paper states no cadence; K=1 is every epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mococxr.config import FinetuneConfig
from mococxr.config.protocol import CHEXPERT_LABELLED, FRACTION_EPOCHS
from mococxr.data.splits import percent
from mococxr.errors import ConfigError

# The paper's schedule (FRACTION_EPOCHS) and labelled-set size (CHEXPERT_LABELLED) are protocol constants
# (mococxr/config/protocol.py). CHEXPERT_LABELLED is an estimate (the paper gives neither its split nor
# its frontal filter): within +-5 % of a CheXpert point n gets that point's epochs exactly, so a CheXpert
# run gets the paper's 220/95/41/18 whatever its split holds; between the plateaus epochs interpolate
# linearly in log10(n), continuously.
SIZE_TOLERANCE = 1.05


def epochs_for_size(n: int) -> int:
    """The paper's epochs for a labelled set of ``n`` images (rule size; see ``CHEXPERT_LABELLED``):
    clamped below 172 images (220) and above 172,000 (18)."""
    if n < 1:
        raise ConfigError(f"a labelled set needs at least one image, got {n}")
    xs, ys = [], []
    for fraction, epochs in FRACTION_EPOCHS:
        centre = math.log10(fraction * CHEXPERT_LABELLED)
        xs += [centre - math.log10(SIZE_TOLERANCE), centre + math.log10(SIZE_TOLERANCE)]
        ys += [epochs, epochs]
    return int(round(float(np.interp(math.log10(n), xs, ys))))


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

    ``rule_epochs`` come from ``--epochs`` when set, else from MoCo-CXR's schedule by label fraction or by
    labelled-set size (``epochs_rule``, times ``epochs_scale``); ``min_steps`` is a floor on top of either:
    the run trains ``max(rule_epochs, ceil(min_steps / steps_per_epoch))`` epochs. ``steps_per_epoch`` is
    what the train loader yields (see :func:`train_loader`), so a tiny draw trains long enough to converge.
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
        return {
            "epochs_resolved": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer_steps": self.optimizer_steps,
        }

    def describe(self) -> str:
        steps = f"{self.optimizer_steps} optimizer steps, {self.steps_per_epoch} per epoch"
        if self.epochs > self.rule_epochs:
            raised = f"min_steps {self.min_steps} raised them from {self.rule_epochs}, {self.rule}"
            return f"{self.epochs} ({raised}); {steps}"
        met = f"; min_steps {self.min_steps} already met" if self.min_steps else ""
        return f"{self.epochs} ({self.rule}{met}); {steps}"


def training_budget(cfg: FinetuneConfig, steps_per_epoch: int, n_labelled: int | None = None) -> Budget:
    """The :class:`Budget` of ``cfg`` for a train loader of ``steps_per_epoch`` batches over a draw of
    ``n_labelled`` labelled training images (which rule ``size`` needs)."""
    if cfg.epochs:
        rule_epochs, rule = cfg.epochs, "set by --epochs"
    elif cfg.epochs_rule == "size":
        if n_labelled is None:
            raise ConfigError("epochs_rule size keys the epochs to the labelled-set size: pass n_labelled")
        rule_epochs = max(1, int(round(epochs_for_size(n_labelled) * cfg.epochs_scale)))
        rule = _size_rule(cfg, n_labelled)
    else:
        rule_epochs, rule = (
            max(1, int(round(epochs_for_fraction(cfg.fraction) * cfg.epochs_scale))),
            _epoch_rule(cfg),
        )
    steps_per_epoch = max(1, steps_per_epoch)
    epochs = max(rule_epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    return Budget(epochs, steps_per_epoch, rule_epochs, rule, cfg.min_steps)


def _epoch_rule(cfg: FinetuneConfig) -> str:
    scale = f" x epochs_scale {cfg.epochs_scale:g}" if cfg.epochs_scale != 1 else ""
    return f"MoCo-CXR's label-fraction schedule for {percent(cfg.fraction)}{scale}"


def _size_rule(cfg: FinetuneConfig, n: int) -> str:
    scale = f" x epochs_scale {cfg.epochs_scale:g}" if cfg.epochs_scale != 1 else ""
    return (
        f"MoCo-CXR's schedule by labelled-set size for {n:,} labelled images (CheXpert's "
        f"{CHEXPERT_LABELLED:,} x 0.1/1/10/100 % -> 220/95/41/18 epochs, log-interpolated){scale}"
    )


def validation_epochs(epochs: int, every: int) -> list[int]:
    """The epochs (1-based) after which a run of ``epochs`` validates: every ``every``-th and the last."""
    every = max(1, every)
    return sorted({e for e in range(every, epochs + 1, every)} | {epochs})
