"""Training budgets: the size rule (epochs keyed to the number of labelled images), its CheXpert points,
Shenzhen's size-scaled steps, and the min_steps floor under either protocol."""

from __future__ import annotations

import math

import pytest

from mococxr.config import FinetuneConfig
from mococxr.config.protocol import CHEXPERT_LABELLED, FRACTION_EPOCHS
from mococxr.errors import ConfigError
from mococxr.flows.cost import resolved_epochs
from mococxr.train.budget import epochs_for_fraction, epochs_for_size, training_budget


def steps(n: int, batch: int = 16) -> int:
    """Optimizer steps per epoch of the train loader (a last short batch dropped)."""
    return n // batch if n > batch else 1


@pytest.mark.parametrize(("fraction", "epochs"), FRACTION_EPOCHS)
def test_a_chexpert_sized_draw_gets_the_papers_epochs(fraction, epochs):
    """n = fraction x 172,000 (CheXpert's labelled training images) and +-5 % of it: 220/95/41/18."""
    assert CHEXPERT_LABELLED == 172_000
    n = fraction * CHEXPERT_LABELLED
    for k in (0.95, 1.0, 1.05):
        size = round(n * k)
        assert epochs_for_size(size) == epochs, (fraction, k)
        cfg = FinetuneConfig(epochs_rule="size", fraction=fraction)
        assert training_budget(cfg, steps(size), size).epochs == epochs == epochs_for_fraction(fraction)


def test_size_rule_interpolates_in_log_size_and_clamps():
    assert epochs_for_size(1) == epochs_for_size(29) == 220  # below CheXpert's 0.1 % draw: clamped
    assert epochs_for_size(10_000_000) == 18
    sizes = [round(10 ** (x / 10)) for x in range(0, 71)]
    assert all(
        a >= b for a, b in zip(map(epochs_for_size, sizes), map(epochs_for_size, sizes[1:]), strict=False)
    )
    # between the +-5 % plateaus, linear in log10(n): the geometric midpoint of 1,720 and 17,200 is halfway
    assert epochs_for_size(round(math.sqrt(1_720 * 17_200))) == round((95 + 41) / 2)
    with pytest.raises(ConfigError):
        epochs_for_size(0)


def test_a_shenzhen_sized_set_trains_as_long_as_chexperts_smallest_draw():
    """Shenzhen's ~463 training images at 6.25/25/100 %: 220/220/167 epochs, steps that scale with size."""
    got = []
    for fraction, n in ((0.0625, 29), (0.25, 116), (1.0, 463)):
        cfg = FinetuneConfig(protocol="e2e", epochs_rule="size", fraction=fraction)
        budget = training_budget(cfg, steps(n), n)
        assert resolved_epochs(cfg, n) == budget.epochs  # --plan prices what runs
        got.append((budget.epochs, budget.optimizer_steps))
    assert got == [(220, 220), (220, 1_540), (167, 167 * 28)]
    # the fraction rule (the default) gives the same draws CheXpert's epochs at that fraction
    today = training_budget(FinetuneConfig(protocol="e2e", fraction=0.0625), 1, 29)
    assert (today.epochs, today.optimizer_steps) == (epochs_for_fraction(0.0625), 52)


def test_the_size_rule_names_itself_and_needs_the_size():
    cfg = FinetuneConfig(epochs_rule="size", fraction=0.0625, epochs_scale=0.5)
    budget = training_budget(cfg, 1, 29)
    assert budget.epochs == 110
    assert "labelled-set size for 29 labelled images" in budget.describe()
    assert "172,000" in budget.rule and "x epochs_scale 0.5" in budget.rule
    assert "label-fraction" in training_budget(FinetuneConfig(fraction=0.0625), 1).describe()
    with pytest.raises(ConfigError, match="n_labelled"):
        training_budget(cfg, 1)
    # an explicit --epochs overrides either rule
    assert training_budget(FinetuneConfig(epochs=7, epochs_rule="size"), 3, 50).epochs == 7


@pytest.mark.parametrize("protocol", ["linear", "e2e"])
def test_min_steps_floors_either_protocol_under_the_size_rule(protocol):
    cfg = FinetuneConfig(protocol=protocol, epochs_rule="size", fraction=0.0625, min_steps=500)
    budget = training_budget(cfg, 1, 29)
    assert (budget.epochs, budget.rule_epochs, budget.optimizer_steps) == (500, 220, 500)
    assert "min_steps 500 raised them from 220" in budget.describe()
    met = training_budget(FinetuneConfig(protocol=protocol, epochs_rule="size", min_steps=200), 7, 116)
    assert met.epochs == 220 and "min_steps 200 already met" in met.describe()
